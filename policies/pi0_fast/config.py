"""pi0-FAST configuration, read from a LeRobot `pi0_fast` checkpoint's config.json.

Honoured: `input_features` / `output_features`, `normalization_mapping`, `chunk_size`, `n_action_steps`
(LeRobot decodes FAST tokens into an `n_action_steps` x action_dim chunk, not chunk_size: so do we, always
with the checkpoint's own value; the load option `n_action_steps` only cuts the decoded chunk short),
`max_state_dim` / `max_action_dim` (no effect at inference: the state is discretised unpadded),
`tokenizer_max_length`, `max_decoding_steps`, `fast_skip_tokens`, `temperature` (0 only: greedy),
`validate_action_token_prefix`, `use_relative_actions` / `relative_exclude_joints` /
`action_feature_names`, `empty_cameras`, `image_resolution`, `paligemma_variant`, `dtype`,
`text_tokenizer_name`, `action_tokenizer_name` (where the tokenizers come from when the checkpoint
directory holds none), and the extra key `vla_steer_architecture` (tiny test sizes). Training-only
and runtime keys are listed in `NO_EFFECT`; real-time chunking, `n_obs_steps` > 1, sampling at a
temperature and any unknown key are refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from policies.pi0.config import (
    ARCH_KEY,
    NO_EFFECT,
    NORM_MODES,
    VARIANTS,
    Feature,
    GemmaDims,
    VisionDims,
    _feature,
    relative_mask,
)

log = logging.getLogger(__name__)

HONOURED = frozenset({
    "type", "n_obs_steps", "input_features", "output_features", "normalization_mapping", "chunk_size",
    "n_action_steps", "max_state_dim", "max_action_dim", "max_action_tokens", "tokenizer_max_length",
    "max_decoding_steps", "fast_skip_tokens", "temperature", "validate_action_token_prefix", "use_kv_cache",
    "use_relative_actions", "relative_exclude_joints", "action_feature_names", "empty_cameras",
    "image_resolution", "paligemma_variant", "action_expert_variant", "dtype", "text_tokenizer_name",
    "action_tokenizer_name", "rtc_config", ARCH_KEY,
})  # fmt: skip
# max_action_tokens: the training target length; action_expert_variant: pi0-FAST builds no expert;
# use_kv_cache: decoding is cached here either way (LeRobot's uncached loop computes the same tokens).


@dataclass(frozen=True)
class FastArchitecture:
    """PaliGemma only (pi0-FAST has no action expert): the Gemma, SigLIP and the vocabulary size."""

    paligemma: GemmaDims = VARIANTS["gemma_2b"]
    vision: VisionDims = field(default_factory=VisionDims)
    vocab_size: int = 257_152

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "architecture") -> FastArchitecture:
        try:
            return cls(
                paligemma=GemmaDims(**data["paligemma"]),
                vision=VisionDims(**data.get("vision", {})),
                vocab_size=int(data["vocab_size"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: malformed {ARCH_KEY}: {e}") from None


@dataclass
class FastConfig:
    architecture: FastArchitecture = field(default_factory=FastArchitecture)
    images: list[Feature] = field(default_factory=list)
    state: Feature | None = None
    action: Feature = field(default_factory=lambda: Feature("action", "ACTION", (7,)))
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    tokenizer_max_length: int = 200
    max_decoding_steps: int = 256
    fast_skip_tokens: int = 128
    validate_action_token_prefix: bool = True
    normalization: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    relative_actions: bool = False
    relative_mask: tuple[bool, ...] = ()
    empty_cameras: int = 0
    dtype: str | None = None
    text_tokenizer_name: str = "google/paligemma-3b-pt-224"
    action_tokenizer_name: str = "lerobot/fast-action-tokenizer"
    layout: str = "lerobot"  # for the shared stats reader (policies.pi0.checkpoint)

    def __post_init__(self):
        for name in ("chunk_size", "n_action_steps", "max_state_dim", "tokenizer_max_length",
                     "max_decoding_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f"n_action_steps ({self.n_action_steps}) exceeds chunk_size ({self.chunk_size})")
        if self.fast_skip_tokens < 0:
            raise ValueError(f"fast_skip_tokens must be >= 0, got {self.fast_skip_tokens}")
        for kind, mode in self.normalization.items():
            if mode not in NORM_MODES:
                raise ValueError(f"normalization_mapping.{kind} is {mode!r}; expected one of {NORM_MODES}")
        if self.state is None:
            raise ValueError("pi0-FAST needs a STATE input feature (the state is written into the prompt)")
        if self.relative_actions and self.state.shape[0] < self.action.shape[0]:
            raise ValueError(
                f"use_relative_actions adds the state to the actions, but the state has "
                f"{self.state.shape[0]} values and the actions {self.action.shape[0]}"
            )

    @property
    def action_dim(self) -> int:
        return self.action.shape[0]

    @property
    def state_dim(self) -> int:
        return self.state.shape[0]

    def to_lerobot_dict(self) -> dict[str, Any]:
        """The LeRobot config.json fields inference reads (what `save` writes)."""
        a = self.architecture
        feats = {f.name: {"type": f.kind, "shape": list(f.shape)} for f in self.images}
        feats[self.state.name] = {"type": "STATE", "shape": list(self.state.shape)}
        out = {
            "type": "pi0_fast",
            "n_obs_steps": 1,
            "input_features": feats,
            "output_features": {self.action.name: {"type": "ACTION", "shape": list(self.action.shape)}},
            "normalization_mapping": dict(self.normalization),
            "chunk_size": self.chunk_size,
            "n_action_steps": self.n_action_steps,
            "max_state_dim": self.max_state_dim,
            "tokenizer_max_length": self.tokenizer_max_length,
            "max_decoding_steps": self.max_decoding_steps,
            "fast_skip_tokens": self.fast_skip_tokens,
            "temperature": 0.0,
            "validate_action_token_prefix": self.validate_action_token_prefix,
            "image_resolution": [a.vision.image_size, a.vision.image_size],
            "empty_cameras": self.empty_cameras,
            "use_relative_actions": self.relative_actions,
            "text_tokenizer_name": self.text_tokenizer_name,
            "action_tokenizer_name": self.action_tokenizer_name,
        }
        if self.relative_actions:
            names = [f"a{i}" if m else f"a{i}_kept_absolute" for i, m in enumerate(self.relative_mask)]
            out |= {"action_feature_names": names, "relative_exclude_joints": ["kept_absolute"]}
        if a == FastArchitecture():
            out["paligemma_variant"] = "gemma_2b"
        else:
            out[ARCH_KEY] = a.to_dict()
        return out


def read_config(path: str | Path) -> FastConfig:
    """Parse a LeRobot pi0_fast config.json; errors name the file and key."""
    path = Path(path)
    source = str(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if data.get("type") != "pi0_fast":
        raise ValueError(f"{source}: type is {data.get('type')!r}; this loader reads pi0_fast checkpoints")
    check_keys(data, source)

    if ARCH_KEY in data:
        arch = FastArchitecture.from_dict(data[ARCH_KEY], source)
    else:
        res = data.get("image_resolution") or [224, 224]
        if len(res) != 2 or res[0] != res[1]:
            raise ValueError(f"{source}: image_resolution must be square [N, N], got {res}")
        variant = data.get("paligemma_variant", "gemma_2b")
        if variant not in VARIANTS:
            raise ValueError(
                f"{source}: paligemma_variant is {variant!r}; expected one of {sorted(VARIANTS)}"
            )
        arch = FastArchitecture(paligemma=VARIANTS[variant], vision=VisionDims(image_size=int(res[0])))
    size = arch.vision.image_size

    feats = [_feature(k, v, source) for k, v in (data.get("input_features") or {}).items()]
    images = [f for f in feats if f.kind == "VISUAL"]
    states = [f for f in feats if f.kind == "STATE"]
    outputs = data.get("output_features") or {}
    actions = [_feature(k, v, source) for k, v in outputs.items() if (v or {}).get("type") == "ACTION"]
    if not images:
        raise ValueError(f"{source}: input_features has no VISUAL feature")
    if len(actions) != 1:
        raise ValueError(
            f"{source}: output_features must hold exactly one ACTION feature, got {len(actions)}"
        )
    if len(states) != 1:
        raise ValueError(f"{source}: input_features must hold exactly one STATE feature, got {len(states)}")
    empty = int(data.get("empty_cameras") or 0)
    names = {f.name for f in images}
    images += [Feature(n, "VISUAL", (3, size, size)) for i in range(empty)
               if (n := f"observation.images.empty_camera_{i}") not in names]  # fmt: skip
    relative = bool(data.get("use_relative_actions", False))
    steps, chunk = int(data.get("n_action_steps", 50)), int(data.get("chunk_size", 50))
    if steps != chunk:
        # LeRobot trains on chunk_size-step token sequences but decodes them into n_action_steps steps:
        # followed here, but the DCT coefficients then stand for another horizon than they were fit to.
        log.warning(
            "%s: n_action_steps %d differs from chunk_size %d: decoding into %d steps as LeRobot does, "
            "although the model was trained on %d-step chunks", source, steps, chunk, steps, chunk,
        )  # fmt: skip
    return FastConfig(
        architecture=arch,
        images=images,
        state=states[0],
        action=actions[0],
        chunk_size=chunk,
        n_action_steps=steps,
        max_state_dim=int(data.get("max_state_dim", 32)),
        tokenizer_max_length=int(data.get("tokenizer_max_length", 200)),
        max_decoding_steps=int(data.get("max_decoding_steps", 256)),
        fast_skip_tokens=int(data.get("fast_skip_tokens", 128)),
        validate_action_token_prefix=bool(data.get("validate_action_token_prefix", True)),
        normalization={str(k): str(v) for k, v in (data.get("normalization_mapping") or {}).items()}
        or {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        relative_actions=relative,
        relative_mask=relative_mask(data, actions[0].shape[0]) if relative else (),
        empty_cameras=empty,
        dtype=data.get("dtype"),
        text_tokenizer_name=str(data.get("text_tokenizer_name") or "google/paligemma-3b-pt-224"),
        action_tokenizer_name=str(data.get("action_tokenizer_name") or "lerobot/fast-action-tokenizer"),
    )


def check_keys(data: dict, source: str) -> None:
    """Refuse what this loader cannot honour: unknown keys and settings it does not implement."""
    unknown = sorted(set(data) - HONOURED - NO_EFFECT)
    if unknown:
        raise ValueError(
            f"{source}: unknown config keys {unknown}: this loader does not know what they change, so it "
            "refuses the checkpoint rather than ignore them"
        )
    rtc = data.get("rtc_config")
    if isinstance(rtc, dict) and rtc.get("enabled"):
        raise ValueError(f"{source}: rtc_config.enabled (real-time chunking) is not supported")
    if int(data.get("n_obs_steps", 1)) != 1:
        raise ValueError(
            f"{source}: n_obs_steps is {data['n_obs_steps']}; pi0-FAST takes one observation step"
        )
    if float(data.get("temperature", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"{source}: temperature {data['temperature']}: only greedy decoding (0) is supported"
        )
    if data.get("dtype") not in (None, "float32", "bfloat16"):
        raise ValueError(f"{source}: dtype {data.get('dtype')!r}; expected float32 or bfloat16")
