"""A small VLA in the OpenVLA mould: image patches -> projector -> Llama -> 7 action-bin tokens.

It is a real policy, not a stub: a ViT-style image encoder whose patch embeddings are projected into the
language model's input space and placed after BOS, before the prompt
`In: What action should the robot take to {instruction}?\\nOut:`; greedy decoding of `action_dim` tokens
with the KV cache; each token id decoded as its bin centre with OpenVLA's rule (`vocab - id - 1`, top 256
ids of the tokenizer vocabulary), then optionally un-normalised with q01/q99 statistics.
Built random by `build()` for tests, loaded with `TinyVLA.load(dir)` from its directory:

    policy_config.json   this module's config (image size, patches, action dim, chunk, stats)
    vision.safetensors   image encoder + projector weights
    language/            the Llama (`save_pretrained`) and its tokenizer

Decoding is restricted to action-bin tokens (`constrain_to_bins`, default on), since a small model
has no pretraining that keeps it from emitting words where actions belong.

With `plan_words > 0` the policy first says, in that many words, how it will move ("fast high"), then
decodes its action tokens conditioned on them: an embodied-chain-of-thought VLA (ECoT, Zawalski et al.
2024) in miniature. The plan is decoded greedily among word tokens (or, with `plan_vocab`, among the words
its grammar allows in each place) and returned in `info["plan"]`. Its backbone says it plans, and marks the
forwards that decide the plan words, so a Steerer can steer only those (`positions="plan"`). Once the plan
is said, the positions of its last prompt token and plan words are computed again, unmarked, before the
first action token: the actions read the plan the steered forwards chose from a context steering never
touched. (Left in the cache, the steered keys and values damped a steered "fast" plan's actions by a
quarter on the demo VLA.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from policies.decoding import next_token, redo, stack_prompts
from vla_steer.core import tiny
from vla_steer.core.backbone import Backbone
from vla_steer.core.policy import ActionChunk, Policy, PolicySpec
from vla_steer.core.tokens import ActionBins, TokenLabeler
from vla_steer.wire import Observation

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
CONFIG_FILE = "policy_config.json"


@dataclass
class TinyVLAConfig:
    name: str = "tiny-vla"
    image_key: str = "agentview"
    image_size: int = 32
    patch_size: int = 8
    vision_dim: int = 32
    vision_layers: int = 1
    # "patch": one strided convolution per patch (ViT); "conv": a stack of stride-2 3x3 convolutions down to
    # the same grid, whose overlapping receptive fields localise an object to a fraction of a patch.
    vision_stem: str = "patch"
    action_dim: int = 7
    n_bins: int = 256
    chunk_length: int = 1
    control_hz: float = 10.0
    constrain_to_bins: bool = True
    plan_words: int = 0  # words said before the action tokens (0: OpenVLA's format)
    # The plan's grammar: for each plan word, the words it may be (None: any word token). A model trained on
    # "<speed word> <height word>" plans then never says a height where a speed belongs.
    plan_vocab: list[list[str]] | None = None
    # Per action dimension: un-normalise [-1, 1] to [q01, q99] where mask is true (OpenVLA's rule).
    action_q01: list[float] | None = None
    action_q99: list[float] | None = None
    action_mask: list[bool] | None = None
    action_space: str = "ee_delta"
    # Proprioceptive state (pi0-style, one token after the image tokens), standardised with these stats.
    state_dim: int | None = None
    state_mean: list[float] | None = None
    state_std: list[float] | None = None

    @classmethod
    def from_file(cls, path: Path) -> TinyVLAConfig:
        data = json.loads(path.read_text())
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        return cls(**data)


class ImageEncoder(nn.Module):
    """Patchify, add positions, a few transformer layers: [B, 3, H, W] -> [B, patches, vision_dim]."""

    def __init__(self, cfg: TinyVLAConfig):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2
        if cfg.vision_stem == "patch":
            self.patch = nn.Conv2d(3, cfg.vision_dim, cfg.patch_size, stride=cfg.patch_size)
        elif cfg.vision_stem == "conv":
            halvings = cfg.patch_size.bit_length() - 1
            if cfg.patch_size != 2**halvings or halvings < 1:
                raise ValueError(f"vision_stem 'conv' needs a power-of-two patch_size, not {cfg.patch_size}")
            widths = [3] + [max(16, cfg.vision_dim // 2 ** (halvings - 1 - i)) for i in range(halvings)]
            layers: list[nn.Module] = []
            for i in range(halvings):
                layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.GELU()]
            self.patch = nn.Sequential(*layers[:-1])
        else:
            raise ValueError(f"vision_stem must be 'patch' or 'conv', not {cfg.vision_stem!r}")
        self.pos = nn.Parameter(torch.randn(1, n, cfg.vision_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.vision_dim, 4, 2 * cfg.vision_dim, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.vision_layers, enable_nested_tensor=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        return self.blocks(x)


class TinyVLA(nn.Module, Policy):
    batching = True

    def __init__(self, cfg: TinyVLAConfig, language_model: LlamaForCausalLM, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision = ImageEncoder(cfg)
        d = language_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(cfg.vision_dim, d), nn.GELU(), nn.Linear(d, d))
        # Image tokens on the scale of the word embeddings, so neither drowns the other at init.
        nn.init.normal_(self.projector[2].weight, std=language_model.config.initializer_range)
        self.state_proj = nn.Linear(cfg.state_dim, d) if cfg.state_dim else None
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.bins = ActionBins(vocab_size=len(tokenizer), n_bins=cfg.n_bins)
        shape = (cfg.image_size, cfg.image_size, 3)
        self.spec = PolicySpec(
            cfg.name,
            cfg.action_dim,
            cfg.chunk_length,
            cfg.control_hz,
            {cfg.image_key: shape},
            cfg.state_dim,
            cfg.action_space,
            # no crop, images at exactly the announced size; the gripper is the training data's
            {
                "family": "tiny_vla",
                "gripper": None,
                "action_frame": "absolute",
                "relative_mask": None,
                "center_crop": None,
                "resize": None,
            },  # fmt: skip
        )
        labeler = TokenLabeler.from_tokenizer(
            tokenizer, vocab_size=language_model.config.vocab_size, action_bins=self.bins
        )
        self._backbone = Backbone.from_model(language_model, tokenizer, labeler=labeler, name=cfg.name)
        self._backbone.plans = cfg.plan_words > 0
        self._plan_masks = self._plan_grammar()
        self.eval()

    # -- construction and persistence --------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: TinyVLAConfig | None = None,
        *,
        hidden: int = 48,
        layers: int = 4,
        intermediate: int = 96,
        seed: int = 0,
        words=(),
        corpus=None,
        vocab_size: int = 768,
        tie_embeddings: bool = False,
    ) -> TinyVLA:
        """A randomly initialised TinyVLA with a freshly trained tokenizer (on `corpus`, if given)."""
        cfg = cfg or TinyVLAConfig()
        tokenizer = tiny.build_tokenizer(
            vocab_size=vocab_size, extra_words=words, action_bins=cfg.n_bins, corpus=corpus
        )
        lm = tiny.build_llama(
            tokenizer,
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            action_bins=cfg.n_bins,
            seed=seed,
            tie_embeddings=tie_embeddings,
        )
        torch.manual_seed(seed)
        return cls(cfg, lm, tokenizer)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.language_model.save_pretrained(directory / "language")
        self.tokenizer.save_pretrained(directory / "language")
        weights = {f"vision.{k}": v for k, v in self.vision.state_dict().items()}
        weights |= {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if self.state_proj is not None:
            weights |= {f"state_proj.{k}": v for k, v in self.state_proj.state_dict().items()}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "vision.safetensors"))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> TinyVLA:
        directory = Path(directory)
        for required in (CONFIG_FILE, "vision.safetensors", "language/config.json"):
            if not (directory / required).exists():
                raise FileNotFoundError(f"{directory} is not a TinyVLA checkpoint: {required} is missing")
        cfg = TinyVLAConfig.from_file(directory / CONFIG_FILE)
        lm = LlamaForCausalLM.from_pretrained(directory / "language")
        tokenizer = AutoTokenizer.from_pretrained(directory / "language")
        policy = cls(cfg, lm, tokenizer)
        state = load_file(str(directory / "vision.safetensors"))
        modules = {"vision.": policy.vision, "projector.": policy.projector, "state_proj.": policy.state_proj}
        for prefix, module in modules.items():
            if module is not None:
                module.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                )
        return policy.to(device).eval()

    # -- Policy ------------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] (or [B, H, W, 3]) -> float [B, 3, H, W] in [-1, 1]."""
        x = torch.as_tensor(
            np.array(image), dtype=torch.float32, device=self.device
        )  # copy: wire arrays are read-only
        x = x[None] if x.ndim == 3 else x
        return (x.permute(0, 3, 1, 2) / 127.5) - 1.0

    def prefix_embeddings(self, pixels: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """[BOS, image tokens, (state token)] embeddings [B, n, d] for preprocessed pixels and raw state."""
        embed = self.language_model.get_input_embeddings()
        bos = torch.full((pixels.shape[0], 1), self.tokenizer.bos_token_id, device=self.device)
        parts = [embed(bos), self.projector(self.vision(pixels))]
        if self.state_proj is not None:
            if state is None:
                raise ValueError(f"{self.cfg.name} takes a state of {self.cfg.state_dim} floats")
            mean = torch.tensor(self.cfg.state_mean or [0.0] * self.cfg.state_dim, device=self.device)
            std = torch.tensor(self.cfg.state_std or [1.0] * self.cfg.state_dim, device=self.device)
            parts.append(self.state_proj((state.to(self.device) - mean) / std)[:, None])
        return torch.cat(parts, dim=1)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def word_mask(self) -> torch.Tensor:
        """Additive logit mask allowing only word tokens: no action bins, specials or padding rows."""
        mask = torch.zeros(self.language_model.config.vocab_size, device=self.device)
        mask[self.bins.first_id :] = float("-inf")
        mask[self.tokenizer.all_special_ids] = float("-inf")
        return mask

    def _plan_grammar(self) -> list[torch.Tensor]:
        """One additive logit mask per plan word: the words `plan_vocab` allows there, or any word."""
        cfg = self.cfg
        if cfg.plan_vocab is None:
            return [self.word_mask()] * cfg.plan_words
        if len(cfg.plan_vocab) != cfg.plan_words or not all(cfg.plan_vocab):
            raise ValueError(
                f"{cfg.name}: plan_vocab must list the allowed words of each of the {cfg.plan_words} plan words, "
                f"got {len(cfg.plan_vocab)} lists"
            )
        masks = []
        for place, words in enumerate(cfg.plan_vocab):
            mask = torch.full((self.language_model.config.vocab_size,), float("-inf"), device=self.device)
            for word in words:
                ids = self.tokenizer(word, add_special_tokens=False).input_ids
                if len(ids) != 1 or ids[0] >= self.bins.first_id or ids[0] in self.tokenizer.all_special_ids:
                    raise ValueError(
                        f"{cfg.name}: plan word {place + 1}'s {word!r} is not one word token of the tokenizer"
                    )
                mask[ids[0]] = 0.0
            masks.append(mask)
        return masks

    def prompt_ids(self, instruction: str) -> list[int]:
        prompt = PROMPT.format(instruction=instruction.strip().lower())
        return self.tokenizer(prompt, add_special_tokens=False).input_ids

    def action_token_ids(self, obs: Observation) -> torch.Tensor:
        """Every decoded id for one observation, plan first (see `batch_token_ids`)."""
        return self.batch_token_ids([obs], [self.prompt_ids(obs.instruction)])[0]

    @torch.no_grad()
    def batch_token_ids(
        self, observations: Sequence[Observation], prompts: Sequence[list[int]]
    ) -> torch.Tensor:
        """Greedy decoding of the plan words (if any) then `action_dim` tokens, for prompts of one length
        (no padding: each row computes what it computes alone): prefill once, then one token per step with
        the KV cache. Returns [B, plan_words + action_dim] ids."""
        lm = self.language_model
        state = None
        if self.state_proj is not None:  # (a policy without one ignores any state it is given)
            missing = [i for i, o in enumerate(observations) if o.state is None]
            if missing:
                raise ValueError(
                    f"{self.cfg.name} takes a state of {self.cfg.state_dim} floats: observations {missing} have none"
                )
            state = torch.as_tensor(np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]))
        images = np.stack([o.images[self.cfg.image_key] for o in observations])
        prefix = self.prefix_embeddings(self.preprocess(images), state)
        prompt = stack_prompts(prompts, self.device)
        inputs = torch.cat([prefix, lm.get_input_embeddings()(prompt)], dim=1)
        bin_mask = torch.full((lm.config.vocab_size,), float("-inf"), device=self.device)
        bin_mask[self.bins.first_id : self.bins.vocab_size] = 0.0
        plan_words, n = self.cfg.plan_words, self.cfg.plan_words + self.cfg.action_dim
        backbone, tokens = self._backbone, []
        try:
            backbone.planning = plan_words > 0  # this forward's logits choose the first plan word
            out = lm(inputs_embeds=inputs, use_cache=True, logits_to_keep=1)  # only the last position decides
            for step in range(n):
                logits = out.logits[:, -1]
                if step < plan_words:
                    logits = logits + self._plan_masks[step].to(logits.device)
                elif self.cfg.constrain_to_bins:
                    logits = logits + bin_mask
                token = logits.argmax(-1, keepdim=True)
                tokens.append(token)
                backbone.planning = step + 1 < plan_words
                if step + 1 == plan_words:  # the plan is said: its positions again, unsteered (see above)
                    said = torch.cat([prompt[:, -1:], *tokens], dim=1)
                    out = redo(lm, said, out, keep=inputs.shape[1] - 1)
                elif step + 1 < n:
                    out = next_token(lm, token, out)
        finally:
            backbone.planning = False
        return torch.cat(tokens, dim=1)

    def decode_actions(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids -> bin centres in [-1, 1] -> un-normalised actions where stats say so."""
        actions = np.asarray(self.bins.value(token_ids), dtype=np.float64)
        cfg = self.cfg
        if cfg.action_q01 is not None and cfg.action_q99 is not None:
            q01, q99 = np.asarray(cfg.action_q01), np.asarray(cfg.action_q99)
            mask = np.asarray(cfg.action_mask if cfg.action_mask is not None else [True] * len(q01))
            actions = np.where(mask, 0.5 * (actions + 1.0) * (q99 - q01) + q01, actions)
        return actions.astype(np.float32)

    def infer(self, obs: Observation) -> ActionChunk:
        return self.infer_batch([obs], [None])[0]

    def batch_key(self, obs: Observation) -> int:
        return len(self.prompt_ids(obs.instruction))

    def infer_batch(
        self, observations: Sequence[Observation], episodes: Sequence[Any] = ()
    ) -> list[ActionChunk]:
        """One forward for observations of one prompt length. Stateless: `episodes` is not used."""
        prompts = [self.prompt_ids(o.instruction) for o in observations]
        return [self._chunk(row) for row in self.batch_token_ids(observations, prompts).cpu().numpy()]

    def _chunk(self, decoded: np.ndarray) -> ActionChunk:
        plan, ids = decoded[: self.cfg.plan_words], decoded[self.cfg.plan_words :]
        actions = self.decode_actions(ids)
        info = {"action_tokens": ids.tolist()}
        if self.cfg.plan_words:
            info["plan"] = self.tokenizer.decode(plan.tolist()).strip()
        return ActionChunk(actions=np.tile(actions, (self.cfg.chunk_length, 1)), info=info)
