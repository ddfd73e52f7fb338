"""The HF Prismatic/OpenVLA `config.json`, read without running the checkpoint's code.

A checkpoint's config.json (written by the official `OpenVLAConfig`) names its vision backbone
(`vision_backbone_id`, `timm_model_ids`, `image_sizes`), its projector (`arch_specifier`,
`use_fused_vision_backbone`), its Llama (`text_config`, a diff against Llama-2-7B's defaults, with
`vocab_size` 32064: 32000 tokens padded to `pad_to_multiple_of` 64) and, for OpenVLA, the action
statistics (`norm_stats`) and `n_action_bins`.

One key is ours: `timm_model_args`, a list (one dict per featurizer) of architecture overrides with
timm's `create_model` keyword names (`embed_dim`, `depth`, `num_heads`, `mlp_ratio`, ...). Real
checkpoints do not have it; the tiny test checkpoints use it to shrink the ViTs while keeping the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from policies.openvla.vit import ViTSpec

# timm model entry points Prismatic uses (timm 0.9.x `vision_transformer.py`), by architecture name
# (the part of a timm id before the pretrained tag, e.g. ".lvd142m").
TIMM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_large_patch14_reg4_dinov2": dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4,
        no_embed_class=True,
    ),
    "vit_so400m_patch14_siglip_224": dict(
        patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
        global_pool="map",
    ),
    "vit_so400m_patch14_siglip_384": dict(
        patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
        global_pool="map",
    ),
}  # fmt: skip

# The official configuration's tables, for configs that name only `vision_backbone_id`.
VISION_BACKBONES: dict[str, tuple[list[str], list[int]]] = {
    "dinov2-vit-l": (["vit_large_patch14_reg4_dinov2.lvd142m"], [224]),
    "siglip-vit-so400m": (["vit_so400m_patch14_siglip_224"], [224]),
    "siglip-vit-so400m-384px": (["vit_so400m_patch14_siglip_384"], [384]),
    "dinosiglip-vit-so-224px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"], [224, 224]),
    "dinosiglip-vit-so-384px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"], [384, 384]),
}  # fmt: skip

# Image normalisation timm's pretrained configs give each backbone (what preprocessor_config.json holds).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
TIMM_NORMALIZATION = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "siglip": (HALF, HALF)}

SUPPORTED_LLMS = ("llama",)
_VIT_ARG_NAMES = {f.name for f in fields(ViTSpec)} - {"timm_id", "img_size"}


class ConfigError(ValueError):
    """A config.json this implementation cannot (or will not) load; the message names the key."""


def vit_spec(timm_id: str, img_size: int, overrides: dict[str, Any] | None = None) -> ViTSpec:
    arch = timm_id.split(".", 1)[0]
    if arch not in TIMM_ARCHS:
        raise ConfigError(
            f"timm_model_ids: unsupported vision backbone {timm_id!r}; supported: {sorted(TIMM_ARCHS)}"
        )
    args = {**TIMM_ARCHS[arch], **(overrides or {})}
    unknown = sorted(set(args) - _VIT_ARG_NAMES)
    if unknown:
        raise ConfigError(
            f"timm_model_args for {timm_id!r}: unknown keys {unknown}; allowed {sorted(_VIT_ARG_NAMES)}"
        )
    return ViTSpec(timm_id=timm_id, img_size=int(img_size), **args)


@dataclass
class PrismaticConfig:
    """What the model needs from config.json; `raw` keeps the file's every key (saved back unchanged)."""

    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    use_fused_vision_backbone: bool
    image_resize_strategy: str
    timm_model_ids: list[str]
    image_sizes: list[int]
    text_config: dict[str, Any]
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    norm_stats: dict[str, Any] | None = None
    timm_model_args: list[dict[str, Any]] | None = None
    model_type: str = "openvla"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> PrismaticConfig:
        model_type = data.get("model_type")
        if model_type not in ("openvla", "prismatic"):
            raise ConfigError(f"{source}: model_type must be 'openvla' or 'prismatic', got {model_type!r}")
        for key in ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "text_config"):
            if key not in data:
                raise ConfigError(f"{source}: missing key {key!r}")
        vb = data["vision_backbone_id"]
        default_ids, default_sizes = VISION_BACKBONES.get(vb, (None, None))
        timm_ids = data.get("timm_model_ids") or default_ids
        sizes = data.get("image_sizes") or default_sizes
        if timm_ids is None or sizes is None:
            raise ConfigError(
                f"{source}: vision_backbone_id {vb!r} is not supported and no timm_model_ids/image_sizes are "
                f"given; supported: {sorted(VISION_BACKBONES)}"
            )
        fused = data.get("use_fused_vision_backbone")
        fused = bool(fused) if fused is not None else vb.startswith(("dinoclip", "dinosiglip"))
        if len(timm_ids) != (2 if fused else 1) or len(sizes) != len(timm_ids):
            raise ConfigError(
                f"{source}: use_fused_vision_backbone={fused} needs {2 if fused else 1} timm_model_ids and "
                f"image_sizes, got {timm_ids} and {sizes}"
            )
        for act in data.get("timm_override_act_layers") or []:
            if act is not None:
                raise ConfigError(f"{source}: timm_override_act_layers {act!r} is not supported (only null)")
        if not data["arch_specifier"].endswith("gelu-mlp"):
            raise ConfigError(
                f"{source}: arch_specifier {data['arch_specifier']!r} is not supported "
                "(expected '...gelu-mlp' or '...fused-gelu-mlp')"
            )
        text = dict(data["text_config"] or {})
        if text.get("model_type", "llama") not in SUPPORTED_LLMS:
            raise ConfigError(
                f"{source}: text_config.model_type {text.get('model_type')!r} is not supported; "
                f"supported: {list(SUPPORTED_LLMS)}"
            )
        vit_args = data.get("timm_model_args")
        if vit_args is not None and len(vit_args) != len(timm_ids):
            raise ConfigError(
                f"{source}: timm_model_args needs one entry per timm_model_ids ({len(timm_ids)})"
            )
        return cls(
            vision_backbone_id=vb,
            llm_backbone_id=data["llm_backbone_id"],
            arch_specifier=data["arch_specifier"],
            use_fused_vision_backbone=fused,
            image_resize_strategy=data.get("image_resize_strategy", "letterbox"),
            timm_model_ids=list(timm_ids),
            image_sizes=[int(s) for s in sizes],
            text_config=text,
            pad_token_id=int(data.get("pad_token_id", 32000)),
            pad_to_multiple_of=int(data.get("pad_to_multiple_of", 64)),
            n_action_bins=int(data.get("n_action_bins", 256)),
            norm_stats=data.get("norm_stats"),
            timm_model_args=vit_args,
            model_type=model_type,
            raw=dict(data),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PrismaticConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    # -- derived -----------------------------------------------------------------------------------

    def vit_specs(self) -> list[ViTSpec]:
        args = self.timm_model_args or [{} for _ in self.timm_model_ids]
        return [
            vit_spec(t, s, a) for t, s, a in zip(self.timm_model_ids, self.image_sizes, args, strict=True)
        ]

    def llama_config(self) -> LlamaConfig:
        """Llama-2-7B's defaults overridden by text_config (the official config stores only the diff)."""
        text = {k: v for k, v in self.text_config.items() if k != "model_type"}
        text.setdefault("pad_token_id", self.pad_token_id)
        return LlamaConfig(**text)

    @property
    def token_vocab_size(self) -> int:
        """The tokenizer vocabulary the action bins count down from: padded embedding minus the padding.

        The official code uses `text_config.vocab_size - pad_to_multiple_of` (32064 - 64 = 32000), not
        `len(tokenizer)` (32001 with the added <PAD>)."""
        return self.llama_config().vocab_size - self.pad_to_multiple_of

    def to_dict(self) -> dict[str, Any]:
        """config.json content in the HF Prismatic format (unknown keys of a loaded file kept)."""
        out = dict(self.raw)
        out.update(
            model_type=self.model_type,
            vision_backbone_id=self.vision_backbone_id,
            llm_backbone_id=self.llm_backbone_id,
            arch_specifier=self.arch_specifier,
            use_fused_vision_backbone=self.use_fused_vision_backbone,
            image_resize_strategy=self.image_resize_strategy,
            timm_model_ids=self.timm_model_ids,
            timm_override_act_layers=[None] * len(self.timm_model_ids),
            image_sizes=self.image_sizes,
            text_config=self.text_config,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            n_action_bins=self.n_action_bins,
            norm_stats=self.norm_stats,
        )
        if self.timm_model_args is not None:
            out["timm_model_args"] = self.timm_model_args
        return out


def normalization_for(timm_id: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std timm's data config gives a backbone (DINOv2: ImageNet; SigLIP: 0.5)."""
    for family, stats in TIMM_NORMALIZATION.items():
        if family in timm_id:
            return stats
    raise ConfigError(
        f"no image normalisation known for {timm_id!r}; supported families {sorted(TIMM_NORMALIZATION)}"
    )
