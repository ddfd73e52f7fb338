"""The pi0-FAST policy: observation -> prompt with the discretised state -> greedy FAST tokens -> action chunk.

    policy = PI0FastPolicy.load("checkpoints/pi0fast_libero", device="cuda")
    chunk = policy.infer(obs)          # chunk.info["action_tokens"]: the decoded vocabulary ids

LeRobot's inference, step by step: state normalised, discretised into 256 bins of [-1, 1]
(`np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1`), prompt `Task: {task}, State: {bins};\\n` tokenised by
PaliGemma's tokenizer (BOS first, cut at tokenizer_max_length), BOS appended; greedy decoding until "|"
or max_decoding_steps; detokenising: the pieces must start with "Action", ":" when
validate_action_token_prefix is set (else an error, as LeRobot's assertion), everything from the first
"|" is cut, every "Action: " piece sequence removed, ids mapped back to FAST ids
(`vocab_size - 1 - fast_skip_tokens - id`) and decoded by the FAST tokenizer into an
n_action_steps x action_dim chunk (zeros where they do not decode); un-normalised; the state added back
for relative actions.

Steerable stack (`policy.backbones`): "language", the PaliGemma Gemma, projectable onto the vocabulary,
its FAST action tokens labelled `[FAST k]` so discovery tells word neurons from action neurons. Here the
language model writes the action tokens itself: steering reaches the actions directly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.pi0 import checkpoint as ckpt
from policies.pi0.policy import (
    EMPTY_CAMERA,
    TOKENIZER_FILES,
    _dtype,
    _reset_buffers,
    default_image_key,
    resize_with_pad,
)
from policies.pi0_fast.config import FastConfig, read_config
from policies.pi0_fast.fast import FILES as FAST_FILES
from policies.pi0_fast.fast import FastTokenizer
from policies.pi0_fast.modeling import LANGUAGE_LAYERS, PI0FastModel
from policies.weights import local_checkpoint
from vla_steer.core.backbone import Backbone
from vla_steer.core.policy import ActionChunk, Policy, PolicySpec
from vla_steer.core.tokens import FastActionTokens, TokenLabeler
from vla_steer.wire import Observation

FAST_DIR = "fast_tokenizer"  # where `save` puts the FAST processor, and `load` looks first
HUB_PATTERNS = ("config.json", ckpt.WEIGHTS, "policy_*processor*", *TOKENIZER_FILES, f"{FAST_DIR}/*")
END_OF_ACTION = "|"
ACTION_PREFIX = "Action: "


class InvalidActionTokens(ValueError):
    """The decoded tokens break a rule the checkpoint asks to enforce (validate_action_token_prefix)."""


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalised state -> 256 bins of [-1, 1] (openpi's PaligemmaTokenizer and LeRobot: -1 below, 255 above)."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def prompt_text(instruction: str, bins: np.ndarray) -> str:
    clean = instruction.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {clean}, State: {' '.join(map(str, bins))};\n"


class PI0FastPolicy(Policy):
    def __init__(
        self,
        cfg: FastConfig,
        model: PI0FastModel,
        tokenizer: Any,
        fast: FastTokenizer,
        *,
        state_norm: ckpt.Normalizer,
        action_norm: ckpt.Normalizer,
        image_keys: dict[str, str] | None = None,
        name: str = "pi0_fast",
    ):
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.fast = fast
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError(
                "pi0-FAST's tokenizer must define a BOS token (the prompt starts and ends with it)"
            )
        self.actions = FastActionTokens(tokenizer.vocab_size, fast.n_tokens, cfg.fast_skip_tokens)
        if self.actions.first_id < 0 or self.actions.last_id >= cfg.architecture.vocab_size:
            raise ValueError(
                f"the FAST tokenizer's {fast.n_tokens} tokens do not fit below id {self.actions.last_id} "
                f"(tokenizer vocab_size {tokenizer.vocab_size} - 1 - fast_skip_tokens {cfg.fast_skip_tokens})"
            )
        self.stop_id = tokenizer.convert_tokens_to_ids(END_OF_ACTION)
        if self.stop_id is None or self.stop_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {END_OF_ACTION!r} token (pi0-FAST's end-of-action marker)"
            )
        self.state_norm, self.action_norm = state_norm, action_norm
        self.stats: dict = {}
        renames = image_keys or {}
        unknown = sorted(set(renames) - {f.name for f in cfg.images})
        if unknown:
            raise ValueError(
                f"image_keys renames unknown image features {unknown}; known {[f.name for f in cfg.images]}"
            )
        real = [f for f in cfg.images if not f.name.startswith(EMPTY_CAMERA)]
        self.image_keys = {f.name: renames.get(f.name, default_image_key(f.name)) for f in real}
        self.spec = PolicySpec(
            name=name,
            action_dim=cfg.action_dim,
            chunk_length=cfg.n_action_steps,
            control_hz=10.0,
            image_keys={self.image_keys[f.name]: (f.shape[1], f.shape[2], 3) for f in real},
            state_dim=cfg.state_dim,
            action_space="checkpoint",
        )
        pg = model.paligemma
        labeler = TokenLabeler.from_tokenizer(tokenizer, vocab_size=pg.lm_head.weight.shape[0],
                                              action_bins=self.actions)  # fmt: skip
        self._backbone = Backbone.from_model(model, tokenizer, layers_path=LANGUAGE_LAYERS, lm_head=pg.lm_head,
                                             labeler=labeler, name=f"{name}/language")  # fmt: skip

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, cfg: FastConfig, tokenizer: Any, fast: FastTokenizer, *, seed: int = 0, stats: dict, **kwargs
    ) -> PI0FastPolicy:
        """A randomly initialised pi0-FAST (tests, benchmarks); `stats`: feature -> {stat: array}."""
        torch.manual_seed(seed)
        model = PI0FastModel(cfg.architecture)
        state_norm, action_norm = _normalizers(cfg, stats, "stats")
        policy = cls(cfg, model, tokenizer, fast, state_norm=state_norm, action_norm=action_norm, **kwargs)
        policy.stats = stats
        return policy

    def save(self, directory: str | Path) -> Path:
        """LeRobot's pi0_fast layout: config.json, model.safetensors, the stats processor files, the
        PaliGemma tokenizer, and the FAST processor in `fast_tokenizer/`."""
        stats = self.stats or {self.cfg.action.name: dict(self.action_norm.stats),
                               self.cfg.state.name: dict(self.state_norm.stats)}  # fmt: skip
        path = ckpt.save_lerobot(self.model, self.cfg, stats, directory)
        self.tokenizer.save_pretrained(path)
        self.fast.save(path / FAST_DIR)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        n_action_steps: int | None = None,
        tokenizer: str | Path | None = None,
        action_tokenizer: str | Path | None = None,
        image_keys: dict[str, str] | None = None,
        norm_stats: str | Path | None = None,
        name: str | None = None,
    ) -> PI0FastPolicy:
        """Load a LeRobot pi0_fast checkpoint directory (or hub id: files only, never code).

        `tokenizer`: PaliGemma's (default: the checkpoint's own files, else its text_tokenizer_name);
        `action_tokenizer`: a FAST processor directory (default: `fast_tokenizer/` in the checkpoint,
        else its action_tokenizer_name: a directory, or a hub id whose files are fetched, no code).
        """
        directory = local_checkpoint(path, HUB_PATTERNS, "a pi0-FAST")
        if not (directory / ckpt.WEIGHTS).exists():
            raise FileNotFoundError(f"{directory} is not a pi0-FAST checkpoint: {ckpt.WEIGHTS} is missing")
        cfg = read_config(directory / "config.json", n_action_steps=n_action_steps)
        # Stats and tokenizers first: a checkpoint that cannot run is refused before the weights are read.
        state_norm, action_norm = ckpt.normalizers(directory, cfg, norm_stats)
        tok = _text_tokenizer(tokenizer, directory, cfg)
        fast = FastTokenizer.load(_fast_directory(action_tokenizer, directory, cfg))
        with torch.device("meta"):
            model = PI0FastModel(cfg.architecture)
        model.to_empty(device="cpu")
        _reset_buffers(model)
        ckpt.load_weights(model, directory)
        model.to(device=device, dtype=_dtype(dtype if dtype is not None else cfg.dtype))
        return cls(cfg, model, tok, fast, state_norm=state_norm, action_norm=action_norm,
                   image_keys=image_keys, name=name or directory.name)  # fmt: skip

    # -- Policy ------------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    @property
    def backbones(self) -> dict[str, Backbone]:
        return {"language": self._backbone}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        """Greedy decoding keeps nothing between chunks."""

    def prompt_ids(self, obs: Observation) -> list[int]:
        """LeRobot's prompt ids: BOS + `Task: ..., State: ...;\\n` (cut at tokenizer_max_length) + BOS."""
        if obs.state is None:
            raise ValueError(f"observation.state is required (shape [{self.cfg.state_dim}])")
        state = np.asarray(obs.state, np.float32).reshape(-1)
        if state.size != self.cfg.state_dim:
            raise ValueError(
                f"observation.state has {state.size} values; this policy takes {self.cfg.state_dim}"
            )
        text = prompt_text(obs.instruction, discretize_state(self.state_norm.normalize(state)))
        ids = self.tokenizer(text)["input_ids"][: self.cfg.tokenizer_max_length]
        return [*ids, self.tokenizer.bos_token_id]

    def images(self, obs: Observation) -> list[torch.Tensor]:
        """The real cameras as [1, 3, S, S] in [-1, 1] (LeRobot: [0, 1], resized with padding, then scaled)."""
        size, out = self.cfg.architecture.vision.image_size, []
        for feature, key in self.image_keys.items():
            img = obs.images.get(key)
            if img is None:
                raise ValueError(f"observation.images is missing {key!r} (feature {feature})")
            x = torch.tensor(img, dtype=torch.float32, device=self.device).permute(2, 0, 1)[None] / 255.0
            if tuple(x.shape[-2:]) != (size, size):
                x = resize_with_pad(x, size, size)
            out.append(x * 2.0 - 1.0)
        return out

    @torch.no_grad()
    def decode_tokens(self, obs: Observation) -> tuple[list[int], torch.Tensor]:
        """Greedy decoded vocabulary ids and each step's logits [n, vocab]."""
        ids = torch.tensor([self.prompt_ids(obs)], device=self.device)
        tokens, logits = self.model(self.images(obs), ids, self.cfg.max_decoding_steps, self.stop_id)
        return tokens.tolist(), logits

    def detokenize(self, ids: list[int]) -> np.ndarray:
        """Decoded vocabulary ids -> normalised actions [n_action_steps, action_dim] (LeRobot's rules)."""
        tok = self.tokenizer
        pieces = tok.convert_ids_to_tokens(list(ids))
        if self.cfg.validate_action_token_prefix and not (
            len(pieces) >= 2 and pieces[0] == "Action" and pieces[1] == ":"
        ):
            raise InvalidActionTokens(
                f"decoded tokens do not start with 'Action', ':' (validate_action_token_prefix is set in the "
                f"checkpoint's config.json): {pieces[:8]}"
            )
        if END_OF_ACTION in pieces:
            pieces = pieces[: pieces.index(END_OF_ACTION)]
        prefix = tok.convert_ids_to_tokens(tok.encode(ACTION_PREFIX, add_special_tokens=False))
        i = 0
        while i <= len(pieces) - len(prefix):
            if pieces[i : i + len(prefix)] == prefix:
                pieces = pieces[:i] + pieces[i + len(prefix) :]
            else:
                i += 1
        fast_ids = [int(self.actions.fast_id(i)) for i in tok.convert_tokens_to_ids(pieces)]
        return self.fast.decode(fast_ids, self.cfg.n_action_steps, self.cfg.action_dim)

    def infer(self, obs: Observation) -> ActionChunk:
        ids, _ = self.decode_tokens(obs)
        actions = self.action_norm.unnormalize(self.detokenize(ids).astype(np.float32))
        if self.cfg.relative_actions:  # LeRobot's AbsoluteActionsProcessorStep: + the raw state, masked
            state = np.asarray(obs.state, np.float32).reshape(-1)[: self.cfg.action_dim]
            actions = actions + state * np.asarray(self.cfg.relative_mask, np.float32)
        return ActionChunk(actions=np.ascontiguousarray(actions, dtype=np.float32),
                           info={"action_tokens": ids})  # fmt: skip

    def with_instruction(self, obs: Observation, instruction: str) -> Observation:
        return replace(obs, instruction=instruction)


# -- helpers -----------------------------------------------------------------------------------------


def _normalizers(cfg: FastConfig, stats: dict, source: str) -> tuple[ckpt.Normalizer, ckpt.Normalizer]:
    def make(feature, kind):
        n = ckpt.Normalizer(cfg.normalization.get(kind, "IDENTITY"),
                            {k: np.asarray(v, np.float32) for k, v in stats.get(feature.name, {}).items()})  # fmt: skip
        n.check(feature.name, feature.shape[0], source)
        return n

    return make(cfg.state, "STATE"), make(cfg.action, "ACTION")


def _text_tokenizer(tokenizer: str | Path | None, directory: Path, cfg: FastConfig):
    from transformers import AutoTokenizer

    if tokenizer is None:
        has_own = any((directory / f).exists() for f in TOKENIZER_FILES)
        tokenizer = directory if has_own else cfg.text_tokenizer_name
    return AutoTokenizer.from_pretrained(tokenizer)


def _fast_directory(option: str | Path | None, directory: Path, cfg: FastConfig) -> Path:
    """Where the FAST processor files are: the option, the checkpoint's `fast_tokenizer/`, the config's
    action_tokenizer_name as a directory, or that name as a hub id (its files only, never its code)."""
    if option is not None:
        if not Path(option).is_dir():
            raise FileNotFoundError(f"action_tokenizer {option}: not a directory")
        return Path(option)
    if (directory / FAST_DIR).is_dir():
        return directory / FAST_DIR
    named = Path(cfg.action_tokenizer_name)
    for candidate in (named, directory / named):
        if candidate.is_dir():
            return candidate
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.action_tokenizer_name, allow_patterns=list(FAST_FILES)))
    except Exception as e:  # offline, unknown repo
        raise FileNotFoundError(
            f"{directory}: no {FAST_DIR}/ directory and the FAST tokenizer {cfg.action_tokenizer_name!r} "
            f"(action_tokenizer_name) cannot be fetched ({type(e).__name__}); pass the option "
            "action_tokenizer=<a directory with tokenizer.json and processor_config.json>"
        ) from None
