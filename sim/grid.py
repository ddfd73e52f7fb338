"""An evaluation grid, defined once: tasks x steering settings x seeds, cut into cells.

A task is one sim config (robosuite), or one task of a LIBERO suite: `--env libero_spatial` means every task of
the suite, `--env libero_spatial:0,3` tasks 0 and 3 (`0-4` a range). A cell is one task x one setting x the
grid's seeds; episode `seed + i` of every setting starts alike (matched seeds). What a cell has done is read
from the rollout store (complete, undamaged episodes whose metadata name the cell's task, setting and seed),
so a rerun skips it and redoes only what is missing (an interrupted episode stays in the store as
incomplete, which the analysis ignores), and the results table (`eval.json`) is computed from the store:
right after a resume, and for each shard of a grid (`shard`: contiguous, balanced blocks of cells).

Torch-free and simulator-free: the driver (`sim.scheduler`) imports it in the main venv, workers in either.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.evaluate import SettingResult, setting_label
from vla_steer.core.config import load_yaml, resolve_config

# LIBERO's suites and their task counts (task_order_index 0), known here so the main venv, which cannot
# import LIBERO, can expand a suite; the worker's LiberoEnv checks task ids against the suite itself.
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
DEFAULT_MAX_STEPS = 200  # robosuite tasks; a LIBERO task's default is its suite's limit
RUN_KEY = "grid_run"  # in each grid episode's metadata: how it ran (`run_fields`, `policy_fields`)
# The flag that sets each of those fields, for the message refusing a resume.
RUN_FLAGS = {
    "policy": "the policy node's policy (--server / --policy)",
    "policy_fingerprint": "the policy node's policy, knobs or settings (--server / --policy, --directions, -o)",
    "max_steps": "--max-steps",
    "execute_steps": "--execute-steps",
    "settle": "settle steps",
    "config_sha256": "the contents of the --env config file",
}
_TASKS = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


@dataclass(frozen=True)
class Task:
    """One environment of the grid: a sim config, and for LIBERO the task's index in its suite."""

    label: str  # "robosuite_lift", "libero_spatial:3": recorded as each episode's task_label
    config: str  # the sim config file
    kind: str  # "robosuite" or "libero"
    task_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "config": self.config, "kind": self.kind, "task_id": self.task_id}


@dataclass(frozen=True)
class Cell:
    """One task x one setting x the seeds it runs."""

    task: Task
    setting: tuple[tuple[str, float], ...]  # sorted by nothing: as given, so labels read as typed
    seeds: tuple[int, ...]

    @property
    def label(self) -> str:
        return setting_label(dict(self.setting))

    def episode_keys(self) -> list[tuple[str, str, int]]:
        """The episodes this cell stands for, as the store knows them."""
        return [(self.task.label, self.label, s) for s in self.seeds]

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task.as_dict(), "setting": dict(self.setting), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cell:
        return cls(
            Task(**d["task"]), tuple((k, float(v)) for k, v in d["setting"].items()), tuple(d["seeds"])
        )


@dataclass(frozen=True)
class Grid:
    tasks: tuple[Task, ...]
    settings: tuple[tuple[tuple[str, float], ...], ...]
    episodes: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"--episodes {self.episodes}: must be at least 1")
        if not self.tasks or not self.settings:
            raise ValueError("a grid needs at least one task (--env) and one setting (--settings)")
        labels = [setting_label(dict(s)) for s in self.settings]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--settings: a setting is given twice ({labels})")
        tasks = [t.label for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"--env: a task is given twice ({tasks})")

    @classmethod
    def build(
        cls, envs: Sequence[str], settings: Sequence[Mapping[str, float]], episodes: int, seed: int = 0
    ) -> Grid:
        tasks = tuple(t for spec in envs for t in parse_env(spec))
        return cls(tasks, tuple(tuple(s.items()) for s in settings), episodes, seed)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.episodes))

    def cells(self) -> list[Cell]:
        """Task-major (a worker keeps its environment from one cell to the next), then settings in order."""
        return [Cell(t, s, self.seeds) for t in self.tasks for s in self.settings]

    def shard(self, index: int, count: int) -> list[Cell]:
        """Shard `index` of `count` (1-based): contiguous blocks of cells, sizes differing by at most one;
        the shards of a grid together are the grid, each cell in exactly one."""
        if count < 1 or not 1 <= index <= count:
            raise ValueError(f"--shard {index}/{count}: expected i/N with 1 <= i <= N")
        cells = self.cells()
        lo, hi = (len(cells) * (index - 1)) // count, (len(cells) * index) // count
        return cells[lo:hi]


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard {text}: expected i/N, e.g. 1/4 (shards are numbered from 1)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"--shard {text}: expected 1 <= i <= N")
    return index, count


def parse_env(spec: str) -> list[Task]:
    """`--env` -> tasks: a sim config (file or shipped name); a LIBERO one optionally `:0,3` or `:0-4`."""
    name, sep, subset = spec.rpartition(":")
    if not sep or not _TASKS.match(subset):
        name, subset = spec, ""
    try:
        path = resolve_config(name, "sims")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"argument --env: {e}") from None
    try:
        doc = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--env {spec}: {path} is not a readable YAML config ({e})") from None
    kind = doc.get("kind", "robosuite") if isinstance(doc, dict) else None
    if kind not in ("robosuite", "libero"):
        raise ValueError(f"--env {spec}: {path} is not a sim config (kind: {kind!r}; robosuite or libero)")
    if kind == "robosuite":
        if subset:
            raise ValueError(
                f"--env {spec}: a task list (:{subset}) is for LIBERO suites; {path} is robosuite"
            )
        return [Task(path.stem, str(path), kind)]
    suite = doc.get("suite")
    if suite not in SUITE_TASKS:
        raise ValueError(f"--env {spec}: {path} names suite {suite!r}; one of {sorted(SUITE_TASKS)}")
    n = SUITE_TASKS[suite]
    ids = _task_ids(subset, n, spec) if subset else list(range(n))
    return [Task(f"{path.stem}:{i}", str(path), kind, i) for i in ids]


def _task_ids(text: str, n: int, spec: str) -> list[int]:
    ids: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
    bad = [i for i in ids if i >= n]
    if bad or len(set(ids)) != len(ids) or not ids:
        why = (
            f"tasks {bad} out of range (0..{n - 1})" if bad else "a task is listed twice or the list is empty"
        )
        raise ValueError(f"--env {spec}: {why}")
    return ids


# -- how a run ran ------------------------------------------------------------------------------------


def run_fields(task: Task, max_steps: int, execute_steps: int | None, settle: int) -> dict[str, Any]:
    """How a task's episodes run, beside the policy: recorded under `RUN_KEY`, compared on resume."""
    digest = hashlib.sha256(Path(task.config).read_bytes()).hexdigest()[:16]
    return {"max_steps": max_steps, "execute_steps": execute_steps, "settle": settle, "config_sha256": digest}


def policy_fields(info: Any) -> dict[str, Any]:
    """The policy node's side (a `ServerInfo`): its policy and a digest of what it says of itself (knobs,
    action and image layout, policy extras), leaving out how it batches, which does not change actions."""
    said = {
        "concepts": sorted(info.concepts), "action_dim": info.action_dim, "chunk_length": info.chunk_length,
        "control_hz": info.control_hz, "image_keys": {k: list(v) for k, v in info.image_keys.items()},
        "info": {k: v for k, v in info.info.items() if k != "inference"},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(said, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"policy": info.policy, "policy_fingerprint": digest}


def check_resume(
    cells: Iterable[Cell],
    done: Mapping[tuple[str, str, int], Any],
    want: Mapping[str, Mapping[str, Any]],
    out: Path,
) -> None:
    """ValueError naming the field, if an episode of these cells that the store `out` holds already ran
    otherwise than `want[task label]` says (the fields given there), or says nothing of how it ran."""
    for c in cells:
        for key in c.episode_keys():
            info = done.get(key)
            if info is None:
                continue
            ran = info.meta.get(RUN_KEY)
            what = f"episode {info.id} ({key[0]}, {key[1]}, seed {key[2]})"
            if not isinstance(ran, dict):
                raise ValueError(
                    f"--out {out}: {what} was not recorded by `vla-steer eval` (by `vla-steer sim`, or an "
                    "older version): it says nothing of how it ran, so it cannot count as this grid's; use "
                    "another --out"
                )
            for field, value in want[c.task.label].items():
                if ran.get(field) != value:
                    raise ValueError(
                        f"--out {out}: {what} ran with {field} {ran.get(field)!r}, this run has {value!r} "
                        f"({RUN_FLAGS.get(field, field)}); resuming would mix two runs' episodes: use another "
                        "--out, or rerun as before"
                    )


# -- what the store holds -------------------------------------------------------------------------


def done_episodes(store_path: Path) -> dict[tuple[str, str, int], Any]:
    """(task_label, setting_label, seed) -> EpisodeInfo of the first usable (complete, undamaged) episode of
    each, as the analysis (`Stores`) counts them."""
    from vla_steer.core.rollouts import open_store

    if not store_path.exists():
        return {}
    done: dict[tuple[str, str, int], Any] = {}
    for info in open_store(store_path).episodes():
        if info.usable and info.grid_key is not None:
            done.setdefault(info.grid_key, info)
    return done


def remaining(cells: Iterable[Cell], done: Mapping[tuple[str, str, int], Any]) -> list[Cell]:
    """The cells with episodes still to run, each with only its missing seeds."""
    out = []
    for c in cells:
        seeds = tuple(s for s in c.seeds if (c.task.label, c.label, s) not in done)
        if seeds:
            out.append(Cell(c.task, c.setting, seeds))
    return out


def results(cells: Sequence[Cell], done: Mapping[tuple[str, str, int], Any]) -> list[SettingResult]:
    """One row per cell from the episodes in the store (each seed once): what `eval.json` holds."""
    rows = []
    for c in cells:
        infos = [done[k] for k in c.episode_keys() if k in done]
        summaries = [i.meta.get("summary") or {} for i in infos]

        def mean(key: str, summaries: list[dict] = summaries) -> float:
            vals = [
                float(v) for s in summaries if isinstance(v := s.get(key), (int, float)) and math.isfinite(v)
            ]
            return float(np.mean(vals)) if vals else float("nan")

        succ = [bool(i.meta.get("success")) for i in infos]
        rows.append(
            SettingResult(
                task=c.task.label,
                setting=c.label,
                episodes=len(infos),
                success_rate=float(np.mean(succ)) if succ else float("nan"),
                mean_length=float(np.mean([i.n_steps for i in infos])) if infos else float("nan"),
                mean_ee_speed=mean("mean_ee_speed"),
                mean_ee_height=mean("mean_ee_height"),
                episode_ids=[i.id for i in infos],
            )
        )
    return rows
