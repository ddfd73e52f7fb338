"""Policies the node can serve: the interface (`base`) and its implementations, loaded from YAML configs.

A policy config (`configs/policies/*.yaml`):

    kind: tiny_vla          # which implementation
    path: ../../demo_out/tiny_vla   # its checkpoint directory, relative to this file (or absolute)
    device: cpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from policies.base import ActionChunk, Observation, Policy, PolicySpec
from vla_steer.config import load_yaml_model

__all__ = ["ActionChunk", "Observation", "Policy", "PolicyConfig", "PolicySpec", "load_policy"]


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["tiny_vla"]
    path: Path
    device: str = "cpu"


def read_policy_config(path: str | Path) -> PolicyConfig:
    """Parse and validate a policy config; errors name the file, the key and what is allowed."""
    path = Path(path)
    cfg = load_yaml_model(path, PolicyConfig, "policy config")
    if not cfg.path.is_absolute():
        cfg.path = (path.parent / cfg.path).resolve()
    return cfg


def load_policy(config: str | Path | PolicyConfig) -> Policy:
    cfg = config if isinstance(config, PolicyConfig) else read_policy_config(config)
    if cfg.kind == "tiny_vla":
        from policies.tiny_vla import TinyVLA

        return TinyVLA.load(cfg.path, device=cfg.device)
    raise ValueError(f"unknown policy kind {cfg.kind!r}")  # unreachable: pydantic checked it
