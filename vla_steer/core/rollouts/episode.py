"""What the store gives back: an episode's listing entry (`EpisodeInfo`) and an episode read in full."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EpisodeInfo:
    """What `Store.episodes` lists. `meta` holds the start metadata updated by `end()` (success, length)."""

    id: str
    path: Path
    meta: dict[str, Any]
    n_steps: int
    complete: bool


@dataclass
class Episode:
    """One episode read back, every per-step field stacked over steps (first axis T)."""

    id: str
    meta: dict[str, Any]
    complete: bool
    arrays: dict[str, np.ndarray]  # state [T, d], action [T, a], action_chunk [T, H, a], reward [T], ...
    images: dict[str, np.ndarray]  # key -> [T, H, W, 3] uint8
    activations: dict[str, np.ndarray]  # name -> [T, ...]
    steering: list[dict | None]  # one per step
    events: list[dict]  # {"t", "kind", "step", ...} in recording order
    tail_error: str | None = None  # why reading stopped early (crash, corruption); None if the log is clean

    @property
    def n_steps(self) -> int:
        return len(self.arrays["t_wall"]) if "t_wall" in self.arrays else 0
