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
n_action_steps x action_dim chunk (zeros where they do not decode), always the checkpoint's own
n_action_steps: the load option `n_action_steps` only keeps the first steps of that chunk; un-normalised;
the state added back for relative actions.

Where openpi's JAX pi0-FAST differs, this follows LeRobot (whose checkpoints it loads): openpi lowercases
the prompt and does not replace "\\n", appends no trailing BOS, decodes the tokens to text and re-encodes
them before the FAST decode, returns zeros where "Action: " is missing (LeRobot asserts: here
InvalidActionTokens when validate_action_token_prefix is set), decodes into its action_horizon (LeRobot:
n_action_steps), and on LIBERO feeds an unmasked zero right-wrist image (LeRobot: the declared cameras
only). An openpi-trained pi0-FAST served here therefore sees slightly other inputs than under openpi.

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
from policies.pi0.inputs import camera_images, camera_keys, state_prompt
from policies.pi0.modeling import place
from policies.pi0.policy import TOKENIZER_FILES, _dtype, _load_tokenizer, _reset_buffers, normalizers_from
from policies.pi0.processors import read_processors
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
        image_keys: dict[str, str | None] | None = None,
        n_action_steps: int | None = None,
        name: str = "pi0_fast",
    ):
        self.cfg = cfg
        self.n_action_steps = _kept_steps(n_action_steps, cfg, "the checkpoint")
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
        # Empty cameras are left out of the prefix: LeRobot's -1 images, masked out of attention and
        # skipped by the position ids, compute the same.
        self.image_keys = camera_keys(cfg.images, image_keys)[0]
        real = [f for f in cfg.images if f.name in self.image_keys]
        self.spec = PolicySpec(
            name=name,
            action_dim=cfg.action_dim,
            chunk_length=self.n_action_steps,
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
        state_norm, action_norm = normalizers_from(cfg, stats)
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
        image_keys: dict[str, str | None] | None = None,
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
        cfg = read_config(directory / "config.json")
        _kept_steps(n_action_steps, cfg, str(directory / "config.json"))
        # Stats and tokenizers first: a checkpoint that cannot run is refused before the weights are read.
        state_norm, action_norm = ckpt.normalizers(directory, cfg, norm_stats)
        procs = read_processors(directory, cfg)  # LeRobot's processor files: honoured or refused
        image_keys = procs.image_keys | (image_keys or {})
        tok = _load_tokenizer(tokenizer, directory, procs.tokenizer_name or cfg.text_tokenizer_name)
        fast = FastTokenizer.load(_fast_directory(action_tokenizer, directory, cfg))
        with torch.device("meta"):
            model = PI0FastModel(cfg.architecture)
        model.to_empty(device="cpu")
        _reset_buffers(model)
        ckpt.load_weights(model, directory)
        place(model, device, _dtype(dtype if dtype is not None else cfg.dtype))
        return cls(cfg, model, tok, fast, state_norm=state_norm, action_norm=action_norm,
                   image_keys=image_keys, n_action_steps=n_action_steps, name=name or directory.name)  # fmt: skip

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
        text = state_prompt(obs.instruction, self.state_norm.normalize(state))
        ids = self.tokenizer(text)["input_ids"][: self.cfg.tokenizer_max_length]
        return [*ids, self.tokenizer.bos_token_id]

    def images(self, obs: Observation) -> list[torch.Tensor]:
        """The real cameras as [1, 3, S, S] in [-1, 1]."""
        return camera_images(obs, self.image_keys, self.cfg.architecture.vision.image_size, self.device)

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
        normed = self.detokenize(ids)[: self.n_action_steps]  # decoded at the checkpoint's horizon, then cut
        actions = self.action_norm.unnormalize(normed.astype(np.float32))
        if self.cfg.relative_actions:  # LeRobot's AbsoluteActionsProcessorStep: + the raw state, masked
            state = np.asarray(obs.state, np.float32).reshape(-1)[: self.cfg.action_dim]
            actions = actions + state * np.asarray(self.cfg.relative_mask, np.float32)
        return ActionChunk(actions=np.ascontiguousarray(actions, dtype=np.float32),
                           info={"action_tokens": ids})  # fmt: skip

    def with_instruction(self, obs: Observation, instruction: str) -> Observation:
        return replace(obs, instruction=instruction)


# -- helpers -----------------------------------------------------------------------------------------


def _kept_steps(option: int | None, cfg: FastConfig, source: str) -> int:
    """The steps served: the option cuts the chunk decoded at the checkpoint's n_action_steps short."""
    if option is not None and not 1 <= option <= cfg.n_action_steps:
        raise ValueError(
            f"n_action_steps {option}: {source} decodes FAST tokens into {cfg.n_action_steps} steps "
            f"(its n_action_steps); the option keeps 1 to {cfg.n_action_steps} of them"
        )
    return option or cfg.n_action_steps


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
