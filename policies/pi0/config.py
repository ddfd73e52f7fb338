"""pi0 and pi0.5 configuration: the architecture (dimensions) and the policy settings read from a checkpoint.

Two checkpoint `config.json` flavours are understood, each for both variants (`PI0Config.variant`):

- LeRobot (`"type": "pi0"` or `"pi05"`): `chunk_size`, `n_action_steps`, `max_state_dim`, `max_action_dim`,
  `num_inference_steps` (older: `num_steps`), `input_features` / `output_features`,
  `normalization_mapping`, `tokenizer_max_length`, `image_resolution` (older:
  `resize_imgs_with_padding`), `min_period` / `max_period`, `paligemma_variant` /
  `action_expert_variant` (older checkpoints have none: gemma_2b + gemma_300m).
- openpi's converted PyTorch checkpoints (`examples/convert_jax_model_to_pytorch.py`): `action_dim`,
  `action_horizon`, `paligemma_variant`, `action_expert_variant`, `precision`. Image keys, the real
  state/action dims and the norm-stats asset are not in that file; they come from the load options.
  Nor is the variant: a pi0.5 is told by its weights (`time_mlp_in`, read from the safetensors header)
  or an explicit `"pi05": true`.

It is over 400 lines because both flavours and both variants are read in one place, each key honoured or
refused: split, the key lists would drift apart.

pi0.5's defaults differ where its reference configs do: quantile normalisation of state and actions,
a 200-token prompt (the state is written into it).

Every key a config.json carries is honoured or refused (`check_keys`): the inference keys above, plus
`use_relative_actions` / `relative_exclude_joints` / `action_feature_names` (the state is added back to the
un-normalised actions, as LeRobot's AbsoluteActionsProcessorStep does), `empty_cameras` (blank images,
masked out), `dtype` / openpi's `precision` (the default dtype), `n_obs_steps` (1 only), `proj_width` (the
expert's width). Keys that change only training or runtime plumbing are listed in `NO_EFFECT`; an
ALOHA adaptation, real-time chunking or any key not known here is refused. A non-standard architecture (the tiny test model) is stored under the
extra key `vla_steer_architecture`; without it the sizes follow the named Gemma variants and SigLIP
So400m/14, as both reference implementations build them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCH_KEY = "vla_steer_architecture"
# Keys of a LeRobot / openpi config.json that do not change what inference computes: training settings,
# runtime plumbing (device, compile, attention kernel, caching), hub metadata.
NO_EFFECT = frozenset({
    "time_sampling_beta_alpha", "time_sampling_beta_beta", "time_sampling_scale", "time_sampling_offset",
    "gradient_checkpointing", "compile_model", "compile_mode", "device", "use_amp", "use_peft", "use_cache",
    "attention_implementation", "freeze_vision_encoder", "train_expert_only", "train_state_proj",
    "optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay", "optimizer_grad_clip_norm",
    "scheduler_warmup_steps", "scheduler_decay_steps", "scheduler_decay_lr", "push_to_hub", "repo_id",
    "private", "tags", "license", "pretrained_path", "pretrained_revision",
})  # fmt: skip
HONOURED_LEROBOT = frozenset({
    "type", "n_obs_steps", "input_features", "output_features", "normalization_mapping", "chunk_size",
    "n_action_steps", "max_state_dim", "max_action_dim", "num_inference_steps", "num_steps",
    "tokenizer_max_length", "image_resolution", "resize_imgs_with_padding", "min_period", "max_period",
    "paligemma_variant", "action_expert_variant", "empty_cameras", "use_relative_actions",
    "relative_exclude_joints", "action_feature_names", "dtype", "proj_width", "adapt_to_pi_aloha",
    "use_delta_joint_actions_aloha", "rtc_config", ARCH_KEY,
})  # fmt: skip
HONOURED_OPENPI = frozenset({
    "action_dim", "action_horizon", "paligemma_variant", "action_expert_variant", "precision", "dtype",
    "max_token_len", "pi05", ARCH_KEY,
})  # fmt: skip
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
VARIANTS_OF_TYPE = {"pi0": "pi0", "pi05": "pi05"}  # LeRobot `type` -> variant
# Defaults where a config does not say, per variant (openpi `Pi0Config`, LeRobot `PI0Config`/`PI05Config`).
DEFAULT_NORMALIZATION = {
    "pi0": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "pi05": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
}
DEFAULT_PROMPT_LENGTH = {"pi0": 48, "pi05": 200}


@dataclass(frozen=True)
class GemmaDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# openpi `gemma.py: get_config` (lerobot copies it): the two variants pi0 uses.
VARIANTS = {
    "gemma_2b": GemmaDims(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
}


@dataclass(frozen=True)
class VisionDims:
    """SigLIP; the defaults are So400m/14 at 224 px (PaliGemma-3b-224 with pi0's 4304-wide MLP)."""

    hidden: int = 1152
    intermediate: int = 4304
    depth: int = 27
    num_heads: int = 16
    patch: int = 14
    image_size: int = 224

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class PI0Architecture:
    paligemma: GemmaDims = VARIANTS["gemma_2b"]
    expert: GemmaDims = VARIANTS["gemma_300m"]
    vision: VisionDims = field(default_factory=VisionDims)
    vocab_size: int = 257_152
    max_state_dim: int = 32
    max_action_dim: int = 32

    def __post_init__(self):
        p, e = self.paligemma, self.expert
        # The two stacks share one attention per layer (keys and values are concatenated).
        for attr in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(p, attr) != getattr(e, attr):
                raise ValueError(
                    f"pi0 architecture: paligemma.{attr}={getattr(p, attr)} must equal "
                    f"expert.{attr}={getattr(e, attr)} (joint attention)"
                )
        if e.width % 2:
            raise ValueError(f"pi0 architecture: expert.width must be even (time embedding), got {e.width}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "architecture") -> PI0Architecture:
        try:
            return cls(
                paligemma=GemmaDims(**data["paligemma"]),
                expert=GemmaDims(**data["expert"]),
                vision=VisionDims(**data.get("vision", {})),
                vocab_size=int(data["vocab_size"]),
                max_state_dim=int(data.get("max_state_dim", 32)),
                max_action_dim=int(data.get("max_action_dim", 32)),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: malformed {ARCH_KEY}: {e}") from None


@dataclass
class Feature:
    """One input or output of the checkpoint, by its LeRobot name (`observation.images.image`)."""

    name: str
    kind: str  # VISUAL | STATE | ACTION
    shape: tuple[int, ...]


@dataclass
class PI0Config:
    """What inference needs from a checkpoint's config.json (plus our load options)."""

    architecture: PI0Architecture = field(default_factory=PI0Architecture)
    images: list[Feature] = field(default_factory=list)
    state: Feature | None = None
    action: Feature = field(default_factory=lambda: Feature("action", "ACTION", (7,)))
    chunk_size: int = 50
    n_action_steps: int = 50
    num_inference_steps: int = 10
    tokenizer_max_length: int = 48
    min_period: float = 4e-3
    max_period: float = 4.0
    normalization: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    layout: str = "lerobot"  # lerobot | openpi
    # Relative actions: the raw state is added to the un-normalised actions where the mask is true.
    relative_actions: bool = False
    relative_mask: tuple[bool, ...] = ()
    empty_cameras: int = 0  # blank (-1) images with a false mask, after the real ones
    dtype: str | None = None  # the checkpoint's own dtype (a load option overrides it)
    variant: str = "pi0"  # pi0 | pi05

    def __post_init__(self):
        if self.variant not in DEFAULT_PROMPT_LENGTH:
            raise ValueError(f"variant must be one of {sorted(DEFAULT_PROMPT_LENGTH)}, got {self.variant!r}")
        if self.variant == "pi05" and self.state is None:
            raise ValueError("pi0.5 writes the state into its prompt: it needs a STATE input feature")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps must be in 1..chunk_size={self.chunk_size}, got {self.n_action_steps}"
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.action.shape[0] > self.architecture.max_action_dim:
            raise ValueError(
                f"action dim {self.action.shape[0]} exceeds max_action_dim {self.architecture.max_action_dim}"
            )
        if self.state is not None and self.state.shape[0] > self.architecture.max_state_dim:
            raise ValueError(
                f"state dim {self.state.shape[0]} exceeds max_state_dim {self.architecture.max_state_dim}"
            )
        for kind, mode in self.normalization.items():
            if mode not in NORM_MODES:
                raise ValueError(f"normalization_mapping.{kind} is {mode!r}; expected one of {NORM_MODES}")
        for img in self.images:  # any size: resized with padding to the model's (LeRobot, openpi)
            if len(img.shape) != 3 or img.shape[0] != 3:
                raise ValueError(f"image feature {img.name} has shape {list(img.shape)}; expected [3, H, W]")
        if self.relative_actions:
            if self.state is None:
                raise ValueError("use_relative_actions needs a STATE input feature (the state is added back)")
            if self.state.shape[0] < self.action.shape[0]:
                raise ValueError(
                    f"use_relative_actions adds the state to the actions, but the state has "
                    f"{self.state.shape[0]} values and the actions {self.action.shape[0]}"
                )

    @property
    def action_dim(self) -> int:
        return self.action.shape[0]

    @property
    def state_dim(self) -> int | None:
        return None if self.state is None else self.state.shape[0]

    def to_lerobot_dict(self) -> dict[str, Any]:
        """The LeRobot config.json fields inference reads (what `save` writes)."""
        a = self.architecture
        feats = {f.name: {"type": f.kind, "shape": list(f.shape)} for f in self.images}
        if self.state is not None:
            feats[self.state.name] = {"type": "STATE", "shape": list(self.state.shape)}
        out = {
            "type": self.variant,
            "n_obs_steps": 1,
            "input_features": feats,
            "output_features": {self.action.name: {"type": "ACTION", "shape": list(self.action.shape)}},
            "normalization_mapping": dict(self.normalization),
            "chunk_size": self.chunk_size,
            "n_action_steps": self.n_action_steps,
            "max_state_dim": a.max_state_dim,
            "max_action_dim": a.max_action_dim,
            "num_inference_steps": self.num_inference_steps,
            "tokenizer_max_length": self.tokenizer_max_length,
            "image_resolution": [a.vision.image_size, a.vision.image_size],
            "min_period": self.min_period,
            "max_period": self.max_period,
            "empty_cameras": self.empty_cameras,
            "use_relative_actions": self.relative_actions,
        }
        if self.relative_actions:  # the mask as LeRobot rebuilds it: names, and the excluded ones
            names = [f"a{i}" if m else f"a{i}_kept_absolute" for i, m in enumerate(self.relative_mask)]
            out |= {"action_feature_names": names, "relative_exclude_joints": ["kept_absolute"]}
        standard = PI0Architecture(max_state_dim=a.max_state_dim, max_action_dim=a.max_action_dim)
        if a == standard:
            out |= {"paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"}
        else:
            out[ARCH_KEY] = a.to_dict()
        return out


def _variant(data: dict, key: str, default: str, source: str) -> GemmaDims:
    name = data.get(key, default)
    if name not in VARIANTS:
        raise ValueError(f"{source}: {key} is {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _feature(name: str, spec: Any, source: str) -> Feature:
    if not isinstance(spec, dict) or "type" not in spec or "shape" not in spec:
        raise ValueError(f"{source}: feature {name!r} needs 'type' and 'shape', got {spec!r}")
    return Feature(name, str(spec["type"]), tuple(int(s) for s in spec["shape"]))


def read_config(path: str | Path, **overrides: Any) -> PI0Config:
    """Parse a checkpoint's config.json (LeRobot or openpi flavour); errors name the file and key.

    `overrides`: `n_action_steps`, `num_inference_steps`, and for openpi checkpoints `image_keys`
    (list of names), `state_dim`, `action_dim` and `relative_action_dims` (which the openpi config does not
    record: openpi's `pi0_libero` trains with `extra_delta_transform`, actions relative to the state on the
    first 6 dims, `DeltaActions(make_bool_mask(6, -1))`; the state is added back after un-normalising).
    """
    path = Path(path)
    source = str(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object")
    kind = data.get("type")
    if kind is not None and kind not in VARIANTS_OF_TYPE:
        raise ValueError(
            f"{source}: type is {kind!r}; this loader reads pi0 and pi05 checkpoints (pi0fast differs)"
        )
    openpi = kind is None and "action_horizon" in data
    check_keys(data, source, openpi)
    if kind is None and not openpi:
        raise ValueError(
            f"{source}: neither a LeRobot pi0/pi05 config ('type') nor an openpi one (action_horizon)"
        )
    variant = VARIANTS_OF_TYPE[kind] if kind else openpi_variant(data, path.parent)

    if ARCH_KEY in data:
        arch = PI0Architecture.from_dict(data[ARCH_KEY], source)
    else:
        if openpi:
            max_state = max_action = int(data.get("action_dim", 32))
        else:
            max_state, max_action = int(data.get("max_state_dim", 32)), int(data.get("max_action_dim", 32))
        res = data.get("image_resolution") or data.get("resize_imgs_with_padding") or [224, 224]
        if len(res) != 2 or res[0] != res[1]:
            raise ValueError(f"{source}: image_resolution must be square [N, N], got {res}")
        arch = PI0Architecture(
            paligemma=_variant(data, "paligemma_variant", "gemma_2b", source),
            expert=_variant(data, "action_expert_variant", "gemma_300m", source),
            vision=VisionDims(image_size=int(res[0])),
            max_state_dim=max_state,
            max_action_dim=max_action,
        )
    size = arch.vision.image_size
    if "proj_width" in data and int(data["proj_width"]) != arch.expert.width:
        raise ValueError(
            f"{source}: proj_width {data['proj_width']} differs from the expert width {arch.expert.width}"
        )

    relative_dims = overrides.get("relative_action_dims")
    if relative_dims is not None and not openpi:
        raise ValueError(
            f"{source}: relative_action_dims is for openpi checkpoints; a LeRobot config.json records its "
            "own use_relative_actions"
        )
    if openpi:
        keys = overrides.get("image_keys") or ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
        images = [Feature(k, "VISUAL", (3, size, size)) for k in keys]
        state_dim = overrides.get("state_dim") or arch.max_state_dim
        action_dim = int(overrides.get("action_dim") or arch.max_action_dim)
        if relative_dims is not None and not 1 <= int(relative_dims) <= action_dim:
            raise ValueError(
                f"relative_action_dims must be in 1..{action_dim} (the action dims), got {relative_dims}"
            )
        rel = int(relative_dims or 0)
        cfg = PI0Config(
            architecture=arch,
            images=images,
            state=Feature("state", "STATE", (int(state_dim),)),
            action=Feature("actions", "ACTION", (int(action_dim),)),
            chunk_size=int(data["action_horizon"]),
            n_action_steps=int(overrides.get("n_action_steps") or data["action_horizon"]),
            num_inference_steps=int(overrides.get("num_inference_steps") or 10),
            normalization=dict(DEFAULT_NORMALIZATION[variant]),  # openpi: quantiles for pi0.5
            layout="openpi",
            tokenizer_max_length=int(data.get("max_token_len", DEFAULT_PROMPT_LENGTH[variant])),
            dtype=data.get("precision", data.get("dtype")),
            relative_actions=rel > 0,
            relative_mask=(True,) * rel + (False,) * (action_dim - rel) if rel else (),
            variant=variant,
        )
        return cfg

    inputs = data.get("input_features") or {}
    outputs = data.get("output_features") or {}
    feats = [_feature(k, v, source) for k, v in inputs.items()]
    images = [f for f in feats if f.kind == "VISUAL"]
    states = [f for f in feats if f.kind == "STATE"]
    actions = [_feature(k, v, source) for k, v in outputs.items() if (v or {}).get("type") == "ACTION"]
    if not images:
        raise ValueError(f"{source}: input_features has no VISUAL feature")
    if len(actions) != 1:
        raise ValueError(
            f"{source}: output_features must hold exactly one ACTION feature, got {len(actions)}"
        )
    if len(states) > 1:
        raise ValueError(f"{source}: input_features holds {len(states)} STATE features; pi0 takes one")
    steps = data.get("num_inference_steps", data.get("num_steps", 10))
    empty = int(data.get("empty_cameras") or 0)
    names = {f.name for f in images}
    images += [Feature(n, "VISUAL", (3, size, size)) for i in range(empty)
               if (n := f"observation.images.empty_camera_{i}") not in names]  # fmt: skip
    relative = bool(data.get("use_relative_actions", False))
    return PI0Config(
        architecture=arch,
        images=images,
        state=states[0] if states else None,
        action=actions[0],
        chunk_size=int(data.get("chunk_size", 50)),
        n_action_steps=int(overrides.get("n_action_steps") or data.get("n_action_steps", 50)),
        num_inference_steps=int(overrides.get("num_inference_steps") or steps),
        tokenizer_max_length=int(data.get("tokenizer_max_length", DEFAULT_PROMPT_LENGTH[variant])),
        min_period=float(data.get("min_period", 4e-3)),
        max_period=float(data.get("max_period", 4.0)),
        normalization={str(k): str(v) for k, v in (data.get("normalization_mapping") or {}).items()}
        or dict(DEFAULT_NORMALIZATION[variant]),
        relative_actions=relative,
        relative_mask=relative_mask(data, actions[0].shape[0]) if relative else (),
        empty_cameras=empty,
        dtype=data.get("dtype"),
        variant=variant,
    )


def openpi_variant(data: dict, directory: Path) -> str:
    """pi0 or pi05, for an openpi config (which its converter writes without the variant): an explicit
    `pi05` key, else the weights' names (pi0.5 has `time_mlp_in`, pi0 `action_time_mlp_in`), read from the
    safetensors header only."""
    if "pi05" in data:
        return "pi05" if data["pi05"] else "pi0"
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return "pi0"
    try:
        with weights.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 100_000_000 else {}
    except (OSError, ValueError):
        return "pi0"  # the weight loader reports an unreadable file properly
    return "pi05" if any(k.removeprefix("model.") == "time_mlp_in.weight" for k in header) else "pi0"


def relative_mask(data: dict, action_dim: int) -> tuple[bool, ...]:
    """Which action dims are relative to the state: LeRobot's rule (RelativeActionsProcessorStep): all,
    unless `action_feature_names` is given, when a name containing any `relative_exclude_joints` entry
    (case-insensitive) stays absolute."""
    exclude = [str(e).lower() for e in (data.get("relative_exclude_joints") or []) if e]
    names = data.get("action_feature_names")
    if not exclude or names is None:
        return (True,) * action_dim
    mask = [not any(e in str(n).lower() for e in exclude) for n in list(names)[:action_dim]]
    return tuple(mask + [True] * (action_dim - len(mask)))


def check_keys(data: dict, source: str, openpi: bool) -> None:
    """Refuse what this loader cannot honour: unknown keys and settings it does not implement."""
    known = (HONOURED_OPENPI if openpi else HONOURED_LEROBOT) | NO_EFFECT
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown config keys {unknown}: this loader does not know what they change, so it "
            "refuses the checkpoint rather than ignore them"
        )
    for key in ("adapt_to_pi_aloha", "use_delta_joint_actions_aloha"):
        if data.get(key):
            raise ValueError(f"{source}: {key}=true (ALOHA joint conventions) is not supported")
    rtc = data.get("rtc_config")
    if isinstance(rtc, dict) and rtc.get("enabled"):
        raise ValueError(f"{source}: rtc_config.enabled (real-time chunking) is not supported")
    if int(data.get("n_obs_steps", 1)) != 1:
        raise ValueError(f"{source}: n_obs_steps is {data['n_obs_steps']}; pi0 takes one observation step")
    if data.get("dtype", data.get("precision")) not in (None, "float32", "bfloat16"):
        raise ValueError(
            f"{source}: dtype {data.get('dtype', data.get('precision'))!r}; expected float32 or bfloat16"
        )
