"""The pi0 policy: observation -> normalised inputs -> flow-matching sampler -> un-normalised action chunk.

    policy = PI0Policy.load("checkpoints/pi0_libero", device="cuda", dtype=torch.bfloat16, seed=0)
    chunk = policy.infer(obs)                    # noise from the seeded generator (re-seeded by reset())
    chunk = policy.infer(obs, noise=noise)       # an explicit [chunk_size, max_action_dim] noise tensor

Steerable stacks (`policy.backbones`): "language" (the PaliGemma Gemma-2B; projectable onto the
vocabulary; it reaches the actions only through the prefix key/value cache) and "action_expert" (the
Gemma-300M expert; no vocabulary: find its directions by contrast, `vla_steer.core.discovery.contrast`).
`policy.backbone` is the language stack. Both share one root module whose single `forward` is a whole
inference, so a Steerer's forward lock spans the prefix pass and every denoising step.

Prompt: BOS + instruction (stripped, "_" and newlines as spaces) + "\\n" (openpi's pi0 format),
truncated to `tokenizer_max_length`; unpadded, which is exactly what padding to the maximum and masking
computes. Images: uint8 [H, W, 3] at the model's resolution, scaled to [-1, 1]. State: normalised with
the checkpoint's stats and zero-padded to `max_state_dim`; actions: the first `action_dim` of the
`max_action_dim` outputs, un-normalised; the first `n_action_steps` of the `chunk_size` are returned.

Over 400 lines on purpose: one model's loading, inputs, sampling and batching, that `PI05Policy` extends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.pi0 import checkpoint as ckpt
from policies.pi0.config import PI0Config, read_config
from policies.pi0.inputs import camera_images, camera_keys
from policies.pi0.modeling import PI0Model, place
from policies.pi0.processors import read_processors
from policies.weights import local_checkpoint
from vla_steer.core.backbone import Backbone
from vla_steer.core.policy import ActionChunk, Policy, PolicySpec
from vla_steer.wire import Observation

DEFAULT_TOKENIZER = "google/paligemma-3b-pt-224"  # what LeRobot and openpi tokenise pi0 prompts with
LANGUAGE_LAYERS = "paligemma_with_expert.paligemma.model.language_model.layers"
EXPERT_LAYERS = "paligemma_with_expert.gemma_expert.model.layers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# What a hub download fetches: config, weights, LeRobot's normaliser files, openpi's norm stats, tokenizer.
HUB_PATTERNS = (
    "config.json",
    ckpt.WEIGHTS,
    "policy_*processor*",
    "assets/*/norm_stats.json",
    *TOKENIZER_FILES,
)


def absolute_actions(actions: np.ndarray, state: Any, mask: tuple[bool, ...]) -> np.ndarray:
    """State-relative actions made absolute: the raw state added where `mask` is true (LeRobot's
    AbsoluteActionsProcessorStep; openpi's `AbsoluteActions`, pi0_libero's mask: 6 true, then false)."""
    s = np.asarray(state, np.float32).reshape(-1)[: len(mask)]
    return actions + s * np.asarray(mask, np.float32)


class PI0Policy(Policy):
    MODEL: type[PI0Model] = PI0Model
    VARIANT = "pi0"  # the checkpoints this class loads (`PI0Config.variant`)
    batching = True

    def __init__(
        self,
        cfg: PI0Config,
        model: PI0Model,
        tokenizer: Any,
        *,
        state_norm: ckpt.Normalizer | None = None,
        action_norm: ckpt.Normalizer | None = None,
        seed: int | None = None,
        image_keys: dict[str, str | None] | None = None,
        name: str | None = None,
    ):
        if cfg.variant != self.VARIANT:
            raise ValueError(f"a {cfg.variant} configuration given to the {self.VARIANT} policy")
        name = name or self.VARIANT
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)  # inference only
        self.tokenizer = tokenizer
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError(
                f"{self.VARIANT}'s tokenizer must define a BOS token (the prompt starts with it)"
            )
        self.state_norm = state_norm
        self.action_norm = action_norm or ckpt.Normalizer()
        self.seed = seed
        self.stats: dict = {}  # feature -> {stat: array}, what `save` writes
        self._generator = torch.Generator()
        self.reset()
        self.image_keys, self.n_empty = camera_keys(cfg.images, image_keys)  # n_empty: -1 images, masked
        real = [f for f in cfg.images if f.name in self.image_keys]
        self.spec = PolicySpec(
            name=name,
            action_dim=cfg.action_dim,
            chunk_length=cfg.n_action_steps,
            control_hz=10.0,
            # the resolution the checkpoint was trained on; any other is resized with padding too
            image_keys={self.image_keys[f.name]: (f.shape[1], f.shape[2], 3) for f in real},
            state_dim=cfg.state_dim,
            action_space="checkpoint",  # whatever the fine-tune's dataset recorded (LIBERO: ee deltas)
            conventions={
                "family": self.VARIANT,  # pi0 or pi05: the profiles differ (relative actions, prompt)
                "gripper": None,  # as the fine-tune's dataset recorded it (LIBERO's: +1 close)
                "action_frame": "absolute",  # a state-relative checkpoint's actions get the state back here
                "relative_mask": list(cfg.relative_mask) if cfg.relative_actions else None,
                "center_crop": None,
                "resize": "pad_bilinear",  # another size is resized with padding (LeRobot, openpi)
            },
        )
        pg = model.paligemma_with_expert.paligemma
        self._backbones = {
            "language": Backbone.from_model(
                model, tokenizer, layers_path=LANGUAGE_LAYERS, lm_head=pg.lm_head, name=f"{name}/language"
            ),
            "action_expert": Backbone.from_model(
                model, None, layers_path=EXPERT_LAYERS, name=f"{name}/action_expert"
            ),
        }

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, cfg: PI0Config, tokenizer: Any, *, seed: int = 0, stats: dict | None = None, **kwargs
    ) -> PI0Policy:
        """A randomly initialised model (tests, benchmarks); `stats` as `read_stats` returns them."""
        torch.manual_seed(seed)
        model = cls.MODEL(cfg.architecture, chunk_size=cfg.chunk_size, min_period=cfg.min_period,
                         max_period=cfg.max_period)  # fmt: skip
        if stats:
            kwargs["state_norm"], kwargs["action_norm"] = normalizers_from(cfg, stats)
        policy = cls(cfg, model, tokenizer, **kwargs)
        policy.stats = stats or {}
        return policy

    def save(self, directory: str | Path, *, layout: str = "lerobot", generation: str = "current") -> Path:
        """Write a checkpoint in LeRobot's (`generation` current | original) or openpi's layout, plus the tokenizer."""
        stats = self.stats or _stats_of(self)
        if layout == "lerobot":
            path = ckpt.save_lerobot(self.model, self.cfg, stats, directory, generation=generation)
        elif layout == "openpi":
            path = ckpt.save_openpi(self.model, self.cfg, stats, directory)
        else:
            raise ValueError(f"layout must be 'lerobot' or 'openpi', got {layout!r}")
        self.tokenizer.save_pretrained(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        n_action_steps: int | None = None,
        num_inference_steps: int | None = None,
        tokenizer: str | Path | None = None,
        image_keys: dict[str, str | None] | None = None,
        norm_stats: str | Path | None = None,
        openpi_image_keys: list[str] | None = None,
        state_dim: int | None = None,
        action_dim: int | None = None,
        relative_action_dims: int | None = None,
        name: str | None = None,
    ) -> PI0Policy:
        """Load a LeRobot or openpi checkpoint directory (config.json + model.safetensors) of this variant.

        `dtype`: float32 (default) or bfloat16; `seed`: deterministic noise (re-seeded at every reset);
        `image_keys`: checkpoint image feature -> observation key (None: an empty camera, -1 and masked);
        `norm_stats`: a stats JSON overriding the checkpoint's; `openpi_image_keys`, `state_dim`,
        `action_dim`, `relative_action_dims` (openpi's state-relative first N action dims, `pi0_libero`: 6):
        what an openpi config lacks.
        """
        directory = local_checkpoint(path, HUB_PATTERNS, f"a {cls.VARIANT}")
        if not (directory / ckpt.WEIGHTS).exists():
            raise FileNotFoundError(
                f"{directory} is not a {cls.VARIANT} checkpoint: {ckpt.WEIGHTS} is missing"
            )
        if state_dim is None or action_dim is None:  # openpi: the dims its norm stats were computed on
            config = json.loads((directory / "config.json").read_text())
            if "action_horizon" in config and "type" not in config:
                stats_state, stats_action = ckpt.openpi_dims(directory, norm_stats)
                state_dim, action_dim = state_dim or stats_state, action_dim or stats_action
        cfg = read_config(
            directory / "config.json",
            n_action_steps=n_action_steps,
            num_inference_steps=num_inference_steps,
            image_keys=openpi_image_keys,
            state_dim=state_dim,
            action_dim=action_dim,
            relative_action_dims=relative_action_dims,
        )
        if cfg.variant != cls.VARIANT:
            raise ValueError(f"{directory} holds a {cfg.variant} checkpoint; load it as kind {cfg.variant}")
        dtype = _dtype(dtype if dtype is not None else cfg.dtype)
        # Stats and tokenizer first: a checkpoint that cannot run is refused before the weights are read.
        state_norm, action_norm = ckpt.normalizers(directory, cfg, norm_stats)
        procs = read_processors(directory, cfg)  # LeRobot's processor files: honoured or refused
        image_keys = procs.image_keys | (image_keys or {})
        tok = _load_tokenizer(tokenizer, directory, procs.tokenizer_name or DEFAULT_TOKENIZER)
        with torch.device("meta"):  # no random init of billions of weights that are overwritten anyway
            model = cls.MODEL(cfg.architecture, chunk_size=cfg.chunk_size, min_period=cfg.min_period,
                              max_period=cfg.max_period)  # fmt: skip
        model.to_empty(device="cpu")
        _reset_buffers(model)
        ckpt.load_weights(model, directory, cls.VARIANT)
        place(model, device, dtype)
        return cls(cfg, model, tok, state_norm=state_norm, action_norm=action_norm, seed=seed,
                   image_keys=image_keys, name=name or directory.name)  # fmt: skip

    # -- Policy ------------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self._backbones["language"]

    @property
    def backbones(self) -> dict[str, Backbone]:
        return dict(self._backbones)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        """A new episode: with a seed, the noise sequence starts over (same seed, same noise)."""
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        else:
            self._generator.seed()

    def sample_noise(self) -> torch.Tensor:
        """[chunk_size, max_action_dim] standard normal from the policy's generator (CPU, device-independent)."""
        shape = (self.cfg.chunk_size, self.cfg.architecture.max_action_dim)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32)

    def prompt_ids(self, instruction: str) -> list[int]:
        clean = instruction.strip().replace("_", " ").replace("\n", " ")
        tok = self.tokenizer
        ids = [tok.bos_token_id, *tok.encode(clean, add_special_tokens=False)]
        ids += tok.encode("\n", add_special_tokens=False)
        return ids[: self.cfg.tokenizer_max_length]

    def model_inputs(
        self, obs: Observation, noise: torch.Tensor | np.ndarray | None = None
    ) -> dict[str, Any]:
        """The tensors `PI0Model.forward` takes, batch of one."""
        state = np.zeros(self.cfg.architecture.max_state_dim, np.float32)
        normed = self.normalized_state(obs)
        if normed is not None:
            state[: normed.size] = normed
        inputs = self.shared_inputs(obs, self.observation_prompt_ids(obs), noise)
        return inputs | {"state": torch.tensor(state, device=self.device)[None]}

    def normalized_state(self, obs: Observation) -> np.ndarray | None:
        """The observation's state normalised with the checkpoint's stats (None: the model takes none)."""
        if self.cfg.state is None:
            return None
        if obs.state is None:
            raise ValueError(f"observation.state is required (shape [{self.cfg.state_dim}])")
        s = np.asarray(obs.state, np.float32).reshape(-1)
        return self.state_norm.normalize(s) if self.state_norm else s

    def shared_inputs(
        self, obs: Observation, prompt_ids: list[int], noise: torch.Tensor | np.ndarray | None
    ) -> dict[str, Any]:
        """Images, prompt tokens, noise and step count: the inputs pi0 and pi0.5 take alike."""
        dev, a = self.device, self.cfg.architecture
        size = a.vision.image_size
        images = camera_images(obs, self.image_keys, size, dev)
        masks = [torch.ones(1, dtype=torch.bool, device=dev) for _ in images]
        for _ in range(self.n_empty):  # blank cameras: -1 everywhere, masked out
            images.append(torch.full((1, 3, size, size), -1.0, device=dev))
            masks.append(torch.zeros(1, dtype=torch.bool, device=dev))
        ids = torch.tensor([prompt_ids], device=dev)
        if noise is None:
            noise = self.sample_noise()
        noise = torch.as_tensor(noise, dtype=torch.float32)
        want = (self.cfg.chunk_size, a.max_action_dim)
        if (
            tuple(noise.shape[-2:]) != want
            or noise.ndim not in (2, 3)
            or (noise.ndim == 3 and noise.shape[0] != 1)
        ):
            raise ValueError(f"noise must have shape {list(want)} (or [1, ...]), got {list(noise.shape)}")
        return {
            "images": images,
            "image_masks": masks,
            "tokens": ids,
            "token_mask": torch.ones_like(ids, dtype=torch.bool),
            "noise": noise.reshape(1, *want).to(dev),
            "num_steps": self.cfg.num_inference_steps,
        }

    @torch.no_grad()
    def infer(self, obs: Observation, *, noise: torch.Tensor | np.ndarray | None = None) -> ActionChunk:
        normed = self.model(**self.model_inputs(obs, noise))[0, :, : self.cfg.action_dim].cpu().numpy()
        return self._chunk(obs, normed)

    def new_episode(self) -> torch.Generator:
        """One client's noise generator, seeded like `reset()` seeds the shared one."""
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g

    def observation_prompt_ids(self, obs: Observation) -> list[int]:
        """An observation's prompt tokens (pi0: its instruction's; pi0.5 writes the state in too)."""
        return self.prompt_ids(obs.instruction)

    def batch_key(self, obs: Observation) -> int:
        return len(self.observation_prompt_ids(obs))

    @torch.no_grad()
    def infer_batch(
        self, observations: Sequence[Observation], episodes: Sequence[torch.Generator | None]
    ) -> list[ActionChunk]:
        """One forward for observations of one prompt length (unpadded, as each alone); each draws its
        noise from its client's generator (None: the shared one), in order."""
        shape = (self.cfg.chunk_size, self.cfg.architecture.max_action_dim)
        noises = [
            self.sample_noise() if g is None else torch.randn(shape, generator=g, dtype=torch.float32)
            for g in episodes
        ]
        inputs = _cat_inputs([self.model_inputs(o, n) for o, n in zip(observations, noises, strict=True)])
        normed = self.model(**inputs)[:, :, : self.cfg.action_dim].cpu().numpy()
        return [self._chunk(o, row) for o, row in zip(observations, normed, strict=True)]

    def _chunk(self, obs: Observation, normed: np.ndarray) -> ActionChunk:
        actions = self.action_norm.unnormalize(normed)
        if self.cfg.relative_actions:
            actions = absolute_actions(actions, obs.state, self.cfg.relative_mask)
        return ActionChunk(
            actions=np.ascontiguousarray(actions[: self.cfg.n_action_steps]),
            info={"chunk_size": self.cfg.chunk_size, "num_inference_steps": self.cfg.num_inference_steps},
        )

    def with_instruction(self, obs: Observation, instruction: str) -> Observation:
        return replace(obs, instruction=instruction)


# -- helpers -----------------------------------------------------------------------------------------


def _cat_inputs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several samples' `model_inputs` as one batch: tensors (and lists of them) concatenated on dim 0
    (`torch.cat` refuses prompts of different lengths)."""
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, list):
            out[k] = [torch.cat(parts) for parts in zip(*(r[k] for r in rows), strict=True)]
        elif isinstance(v, torch.Tensor):
            out[k] = torch.cat([r[k] for r in rows])
        else:
            out[k] = v
    return out


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def _reset_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers a meta-device build leaves empty (rotary frequencies,
    SigLIP position ids, Gemma's embedding scale); everything persistent comes from the checkpoint."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            inv_freq, module.attention_scaling = module.compute_default_rope_parameters(module.config)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()
        if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
            module.position_ids = torch.arange(module.num_positions).expand((1, -1))
        if hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale)


def _load_tokenizer(tokenizer: str | Path | None, directory: Path, default: str = DEFAULT_TOKENIZER):
    """The option, else the checkpoint directory's own tokenizer files, else `default` (a hub id)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        has_own = any((directory / f).exists() for f in TOKENIZER_FILES)
        tokenizer = directory if has_own else default
    return AutoTokenizer.from_pretrained(tokenizer)


def normalizers_from(cfg: PI0Config, stats: dict) -> tuple[ckpt.Normalizer | None, ckpt.Normalizer]:
    def make(feature, kind):
        n = ckpt.Normalizer(cfg.normalization.get(kind, "IDENTITY"),
                            {k: np.asarray(v, np.float32) for k, v in stats.get(feature.name, {}).items()})  # fmt: skip
        n.check(feature.name, feature.shape[0], "stats")
        return n

    return (make(cfg.state, "STATE") if cfg.state else None), make(cfg.action, "ACTION")


def _stats_of(policy: PI0Policy) -> dict:
    out = {policy.cfg.action.name: dict(policy.action_norm.stats)}
    if policy.cfg.state is not None and policy.state_norm is not None:
        out[policy.cfg.state.name] = dict(policy.state_norm.stats)
    return out
