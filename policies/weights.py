"""Strict checkpoint checks shared by the policies that load official weights (OpenVLA, pi0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


class CheckpointError(KeyError, ValueError):
    """A checkpoint does not hold what the model needs; the message names the file and the keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def preview(items: list[str], n: int = 8) -> str:
    """The first n names and how many more: for error messages about many keys."""
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more if items else "none"


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Every expected tensor present with its shape, nothing unknown; else a `CheckpointError` naming them."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match the model: {len(missing)} missing keys: {preview(missing)}; "
            f"{len(unexpected)} unexpected keys: {preview(unexpected)}"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )


def local_checkpoint(path: str | Path, patterns: Sequence[str], what: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded (only the files matching `patterns`: never a
    checkpoint's code) into the hub cache; offline, a hub id already in the cache resolves from it."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not {what} checkpoint directory")
        return p
    looks_local = p.is_absolute() or str(path).startswith(".") or len(p.parts) != 2
    if looks_local:
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=list(patterns)))
    except Exception as e:  # offline and not cached, unknown or gated repo
        raise FileNotFoundError(
            f"hub id {path}: cannot download it ({type(e).__name__}: {e}); download the checkpoint and pass "
            "its directory"
        ) from None
