"""What the store gives back: an episode's listing entry (`EpisodeInfo`) and an episode read in full.

Both say what a damaged log lost: `damage` (byte ranges of the log that hold no usable record) and
`lost_steps` (step index ranges that were recorded but are not in the log any more: known from gaps in the
step indices, the "end" record's count, or the summary written when the episode was closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.damage import Damage, describe_lost


@dataclass(frozen=True)
class EpisodeInfo:
    """What `Store.episodes` lists, read from the log itself (the summary only says what it should hold).
    `meta` holds the start metadata updated by `end()` (success, length)."""

    id: str
    path: Path
    meta: dict[str, Any]
    n_steps: int  # steps the log holds
    complete: bool  # the log has its "end" record
    damage: tuple[Damage, ...] = ()
    lost_steps: tuple[tuple[int, int], ...] = ()
    repaired: dict[str, Any] | None = None  # what `repair` did, from the summary, if it ran

    @property
    def steps_lost(self) -> int:
        return sum(b - a + 1 for a, b in self.lost_steps)

    @property
    def damaged(self) -> bool:
        """Anything recorded is missing or unreadable (status "damaged" or "steps lost")."""
        return bool(self.damage or self.lost_steps)

    @property
    def usable(self) -> bool:
        """Complete and undamaged: an episode a grid counts as done (`sim.grid`) and the analysis pools once."""
        return self.complete and not self.damaged

    @property
    def grid_key(self) -> tuple[str, str, int] | None:
        """(task_label, setting_label, seed), as `vla-steer eval` and `sim` record them: which episode of a grid
        this is (two records with one key are one episode run twice); None for an episode without them."""
        m = self.meta
        task, setting, seed = m.get("task_label"), m.get("setting_label"), m.get("seed")
        if isinstance(task, str) and isinstance(setting, str) and isinstance(seed, int):
            return task, setting, seed
        return None

    @property
    def status(self) -> str:
        """ "damaged" (unreadable bytes: `repair` can clean the log), "steps lost" (a clean log that misses
        recorded steps, e.g. after a repair), "ok" (complete) or "incomplete" (no "end": a crash or abort)."""
        if self.damage:
            return "damaged"
        if self.lost_steps:
            return "steps lost"
        return "ok" if self.complete else "incomplete"

    def describe(self) -> str:
        """One line: the status, what the log holds, and what was lost where."""
        parts = [f"{self.n_steps} steps" + ("" if self.complete else ", no end record")]
        if self.lost_steps:
            parts.append(describe_lost(self.lost_steps))
        parts += [str(d) for d in self.damage]
        if self.repaired:
            parts.append(f"repaired (original kept as {self.repaired.get('backup')})")
        return f"{self.status}: " + "; ".join(parts)


@dataclass
class Episode:
    """One episode read back, every per-step field stacked over the steps the log holds (first axis T)."""

    id: str
    meta: dict[str, Any]
    complete: bool
    arrays: dict[str, np.ndarray]  # state [T, d], action [T, a], action_chunk [T, H, a], reward [T], ...
    images: dict[str, np.ndarray]  # key -> [T, H, W, 3] uint8
    activations: dict[str, np.ndarray]  # name -> [T, ...]
    steering: list[dict | None]  # one per step
    events: list[dict]  # {"t", "kind", "step", ...} in recording order
    step_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [T]: each row's step
    damage: list[Damage] = field(default_factory=list)  # unreadable byte ranges; [] if the log is clean
    lost_steps: list[tuple[int, int]] = field(default_factory=list)  # recorded steps not in the log
    policy_info: list[dict | None] = field(default_factory=list)  # one per step: the reply's scalars, or None

    @property
    def n_steps(self) -> int:
        return len(self.arrays["t_wall"]) if "t_wall" in self.arrays else 0
