"""Policies the node can serve (the interface is `vla_steer.core.policy`), loaded from YAML configs.

A policy config (a path, or the name of a shipped one in `vla_steer/configs/policies`) names its `kind` and
checkpoint `path` (a directory, relative to the YAML file or absolute; `openvla`, `pi0`, `pi05` and `pi0_fast`
also take a hub id on a machine that has a hub), plus options of that kind:

    kind: tiny_vla          # the small OpenVLA-style policy (the bundled demo VLA is one)
    path: ../../../policies/demo/weights
    device: cpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from vla_steer.core.config import load_yaml_model, resolve_config
from vla_steer.core.policy import ActionChunk, Policy, PolicySpec
from vla_steer.wire import Observation

__all__ = [
    "ActionChunk",
    "Observation",
    "Policy",
    "PolicyConfig",
    "PolicySpec",
    "load_policy",
    "read_policy_config",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    device: str = "cpu"


class TinyVLAPolicyConfig(_Config):
    kind: Literal["tiny_vla"]


class OpenVLAPolicyConfig(_Config):
    """Options of `policies.openvla.OpenVLAPolicy.load` (see there)."""

    kind: Literal["openvla"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    unnorm_key: str | None = None
    center_crop: bool | None = None  # None: on for LIBERO fine-tunes (unnorm_key libero_*), else off
    image_key: str = "agentview"
    control_hz: float = Field(5.0, gt=0)
    constrain_to_bins: bool = False


class Pi0PolicyConfig(_Config):
    """Options of `policies.pi0.PI0Policy.load` (see there)."""

    kind: Literal["pi0"]
    dtype: Literal["float32", "bfloat16"] | None = None
    seed: int | None = None
    n_action_steps: int | None = Field(None, gt=0)
    num_inference_steps: int | None = Field(None, gt=0)
    tokenizer: str | None = None
    image_keys: dict[str, str | None] | None = None  # feature -> observation key; null: an empty camera
    norm_stats: Path | None = None
    # What an openpi checkpoint's config.json does not record (LeRobot's does):
    openpi_image_keys: list[str] | None = None
    state_dim: int | None = Field(None, gt=0)
    action_dim: int | None = Field(None, gt=0)
    relative_action_dims: int | None = Field(None, gt=0)  # openpi pi0_libero: 6 (its DeltaActions mask)


class Pi0FastPolicyConfig(_Config):
    """Options of `policies.pi0_fast.PI0FastPolicy.load` (see there)."""

    kind: Literal["pi0_fast"]
    dtype: Literal["float32", "bfloat16"] | None = None
    n_action_steps: int | None = Field(None, gt=0)
    tokenizer: str | None = None
    action_tokenizer: Path | None = None
    image_keys: dict[str, str | None] | None = None  # feature -> observation key; null: an empty camera
    norm_stats: Path | None = None


class Pi05PolicyConfig(Pi0PolicyConfig):
    """Options of `policies.pi05.PI05Policy.load`: pi0's."""

    kind: Literal["pi05"]  # type: ignore[assignment]


PolicyConfig = Annotated[
    TinyVLAPolicyConfig | OpenVLAPolicyConfig | Pi0PolicyConfig | Pi05PolicyConfig | Pi0FastPolicyConfig,
    Field(discriminator="kind"),
]


class _PolicyFile(RootModel[PolicyConfig]):
    pass


def _looks_like_hub_id(path: Path) -> bool:
    return len(path.parts) == 2 and not str(path).startswith(".")


def read_policy_config(path: str | Path) -> PolicyConfig:
    """Parse and validate a policy config (a path or a shipped config's name); errors name the file, the key
    and what is allowed."""
    path = resolve_config(path, "policies")
    cfg = load_yaml_model(path, _PolicyFile, "policy config").root
    if not cfg.path.is_absolute():
        local = (path.parent / cfg.path).resolve()
        # "openvla/openvla-7b" stays a hub id unless such a directory exists next to the config.
        hub = (
            cfg.kind in ("openvla", "pi0", "pi05", "pi0_fast")
            and _looks_like_hub_id(cfg.path)
            and not local.exists()
        )
        cfg.path = cfg.path if hub else local
    for key in ("norm_stats", "action_tokenizer"):  # paths in a config are relative to its file
        value = getattr(cfg, key, None)
        if value is not None and not value.is_absolute():
            setattr(cfg, key, (path.parent / value).resolve())
    return cfg


def load_policy(config: str | Path | PolicyConfig) -> Policy:
    cfg = read_policy_config(config) if isinstance(config, (str, Path)) else config
    if cfg.kind == "tiny_vla":
        from policies.tiny_vla import TinyVLA

        return TinyVLA.load(cfg.path, device=cfg.device)
    if cfg.kind == "openvla":
        from policies.openvla import OpenVLAPolicy

        return OpenVLAPolicy.load(
            cfg.path, device=cfg.device, dtype=cfg.dtype, unnorm_key=cfg.unnorm_key,
            center_crop=cfg.center_crop, image_key=cfg.image_key, control_hz=cfg.control_hz,
            constrain_to_bins=cfg.constrain_to_bins,
        )  # fmt: skip
    if cfg.kind in ("pi0", "pi05"):
        from policies.pi0 import PI0Policy
        from policies.pi05 import PI05Policy

        return (PI05Policy if cfg.kind == "pi05" else PI0Policy).load(
            cfg.path, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, n_action_steps=cfg.n_action_steps,
            num_inference_steps=cfg.num_inference_steps, tokenizer=cfg.tokenizer, image_keys=cfg.image_keys,
            norm_stats=cfg.norm_stats, openpi_image_keys=cfg.openpi_image_keys, state_dim=cfg.state_dim,
            action_dim=cfg.action_dim, relative_action_dims=cfg.relative_action_dims,
        )  # fmt: skip
    if cfg.kind == "pi0_fast":
        from policies.pi0_fast import PI0FastPolicy

        return PI0FastPolicy.load(
            cfg.path, device=cfg.device, dtype=cfg.dtype, n_action_steps=cfg.n_action_steps,
            tokenizer=cfg.tokenizer, action_tokenizer=cfg.action_tokenizer, image_keys=cfg.image_keys,
            norm_stats=cfg.norm_stats,
        )  # fmt: skip
    raise ValueError(f"unknown policy kind {cfg.kind!r}")  # unreachable: pydantic checked it
