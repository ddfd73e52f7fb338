"""Strict checkpoint checks shared by the policies that load official weights (OpenVLA, pi0)."""

from __future__ import annotations

from collections.abc import Mapping

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
