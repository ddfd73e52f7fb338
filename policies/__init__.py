"""Policies the node can serve: the interface (`base`) and its implementations, loaded from YAML configs.

A policy config (`configs/policies/*.yaml`):

    kind: tiny_vla          # which implementation
    path: ../../demo_out/tiny_vla   # its checkpoint directory, relative to this file (or absolute)
    device: cpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from policies.base import ActionChunk, Observation, Policy, PolicySpec

__all__ = ["ActionChunk", "Observation", "Policy", "PolicyConfig", "PolicySpec", "load_policy"]


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["tiny_vla"]
    path: Path
    device: str = "cpu"


def read_policy_config(path: str | Path) -> PolicyConfig:
    """Parse and validate a policy config; errors name the file, the key and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = PolicyConfig.model_validate(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"{path}: {problems}") from None
    if not cfg.path.is_absolute():
        cfg.path = (path.parent / cfg.path).resolve()
    return cfg


def load_policy(config: str | Path | PolicyConfig) -> Policy:
    cfg = config if isinstance(config, PolicyConfig) else read_policy_config(config)
    if cfg.kind == "tiny_vla":
        from policies.tiny_vla import TinyVLA

        return TinyVLA.load(cfg.path, device=cfg.device)
    raise ValueError(f"unknown policy kind {cfg.kind!r}")  # unreachable: pydantic checked it
