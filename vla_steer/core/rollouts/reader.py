"""Reading a store back: `open_store` -> `Store` (list, load, a pandas view), whatever state a crash left.

A `Store` never writes, so it can be opened while nodes are recording. Loading or listing an episode
decodes its log record by record; a truncated or corrupt record is skipped and reading resumes at the next
intact one (`damage.walk`), so damage costs only the records it hit, and says so (`Episode.damage`,
`lost_steps`). The summary written when an episode closes is not trusted for content: it only says how many
steps and bytes the log should hold, so a log cut short after closing is reported as damaged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.damage import Damage, no_arrays, walk
from vla_steer.core.rollouts.episode import Episode, EpisodeInfo
from vla_steer.core.rollouts.files import check_marker
from vla_steer.core.rollouts.format import ID_RE, LOG, MARKER, SUMMARY


class Store:
    """Read access to a rollout store. Never writes, so it can be opened while nodes are recording."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        marker = self.root / MARKER
        if not marker.is_file():
            what = "does not exist" if not self.root.exists() else f"has no {MARKER} (not a rollout store)"
            raise FileNotFoundError(f"rollout store {str(self.root)!r} {what}")
        check_marker(marker)

    def episode_ids(self) -> list[str]:
        d = self.root / "episodes"
        return sorted(p.name for p in d.iterdir() if ID_RE.match(p.name) and p.is_dir()) if d.is_dir() else []

    def episodes(self) -> list[EpisodeInfo]:
        """Every episode in id order, each checked against its log (see `info`)."""
        return [self.info(i) for i in self.episode_ids()]

    def n_closed(self) -> int:
        """How many episodes their writers closed complete, by their summaries alone: a cheap count for
        progress while nodes record (`episodes` reads and checks every log)."""
        return sum(bool((_read_summary(self._path(i)) or {}).get("complete")) for i in self.episode_ids())

    def info(self, episode_id: str) -> EpisodeInfo:
        """An episode's listing entry from its log, every record's crc checked (the arrays are not made):
        steps held, complete or not, and what damage cost (`EpisodeInfo.status`, `damage`, `lost_steps`)."""
        path = self._path(episode_id)
        summary = _read_summary(path)
        ep = _parse(episode_id, _read_log(path), no_arrays, summary)
        repaired = summary["repaired"] if summary else None
        lost = tuple(ep.lost_steps)
        return EpisodeInfo(
            episode_id, path, ep.meta, ep.n_steps, ep.complete, tuple(ep.damage), lost, repaired
        )

    def load(self, episode_id: str, *, images: bool = True, activations: bool = True) -> Episode:
        """Read an episode back: every intact record, resynchronising after damage (see `Episode.damage`,
        `Episode.lost_steps`, and `Episode.step_index` for which recorded step each row is)."""
        path = self._path(episode_id)

        def keep(name: str) -> bool:
            return (images or not name.startswith("img/")) and (activations or not name.startswith("act/"))

        return _parse(episode_id, _read_log(path), keep, _read_summary(path))

    def __len__(self) -> int:
        return len(self.episode_ids())

    def to_pandas(self) -> Any:
        """One row per step of every episode: ids, scalars, 1-D vectors as `<name>_<i>` columns and the
        steering state as `steer_<concept>_<key>`, what the policy said beside its actions as `info_<key>`
        (`info_plan`: a planning policy's plan words). Images, action chunks and activations stay in `load`."""
        import pandas as pd

        frames = []
        for episode_id in self.episode_ids():
            ep = self.load(episode_id, images=False, activations=False)
            if ep.n_steps == 0:
                continue
            cols: dict[str, Any] = {
                "episode": ep.id,
                "step": ep.step_index,
                "complete": ep.complete,
                "success": ep.meta.get("success"),
                "task": ep.meta.get("task"),
            }
            for name, a in ep.arrays.items():
                if a.ndim == 1:
                    cols[name] = a
                elif a.ndim == 2:
                    for j in range(a.shape[1]):
                        cols[f"{name}_{j}"] = a[:, j]
            cols.update(_steering_columns(ep.steering))
            cols.update(_info_columns(ep.policy_info))
            frames.append(pd.DataFrame(cols))
        if not frames:
            return pd.DataFrame(columns=["episode", "step", "complete", "success", "task"])
        return pd.concat(frames, ignore_index=True)

    def _path(self, episode_id: str) -> Path:
        if not isinstance(episode_id, str) or not ID_RE.match(episode_id):
            raise KeyError(f"{episode_id!r} is not an episode id (expected NNNNNN-xxxxxxxx)")
        path = self.root / "episodes" / episode_id
        if not path.is_dir():
            raise KeyError(f"no episode {episode_id!r} in {str(self.root)!r}")
        return path


def open_store(root: str | os.PathLike) -> Store:
    """Open an existing store for reading; a missing path raises FileNotFoundError naming it."""
    return Store(root)


def _read_log(path: Path) -> bytes:
    try:
        return (path / LOG).read_bytes()
    except FileNotFoundError:
        return b""


def _parse(episode_id: str, data: bytes, keep: Callable[[str], bool], summary: dict | None) -> Episode:
    """Every intact record of the log; damaged stretches and missing step indices are reported, not fatal."""
    meta: dict[str, Any] = {}
    complete, seen_any = False, False
    lists: dict[str, list[np.ndarray]] = {}
    steering: list[dict | None] = []
    info: list[dict | None] = []
    index: list[int] = []
    events: list[dict] = []
    scalars: dict[str, list[float]] = {}
    schema: dict[str, tuple[str, tuple[int, ...]]] | None = None
    damage: list[Damage] = []
    lost: list[tuple[int, int]] = []
    recorded = 0  # steps the writer recorded, as far as the log (and summary) tell
    for item in walk(data, keep):
        if isinstance(item, Damage):
            damage.append(item)
            continue
        pos, header, arrays, end = item
        kind = header.get("k")
        try:
            if kind == "meta":
                if seen_any:
                    raise ValueError("a second metadata record")
                meta = dict(header["meta"])
            elif kind == "step":
                i = header["i"]
                table = {str(n): (d, tuple(s)) for n, d, s in header["arrays"]}
                row = dict(header["scalars"])
                if type(i) is not int or i < recorded:
                    raise ValueError(f"step index {i!r} out of order")
                if schema is None:
                    schema, scalars = table, {k: [] for k in row}
                if table != schema or row.keys() != scalars.keys():
                    raise ValueError(f"step {i} does not match the episode's first kept step")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()):
                    raise ValueError(f"step {i} has non-numeric scalars")
                if i > recorded:
                    lost.append((recorded, i - 1))
                for name, a in arrays.items():
                    lists.setdefault(name, []).append(a)
                for k, v in row.items():
                    scalars[k].append(v)
                steering.append(header.get("steering"))
                info.append(header.get("info"))
                index.append(i)
                recorded = i + 1
            elif kind == "event":
                events.append(dict(header["ev"]))
            elif kind == "end":
                complete = True
                meta.update(header.get("final") or {})
                meta["success"] = header.get("success")
                recorded = max(recorded, _count(header.get("n_steps")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            damage.append(Damage(pos, end, f"unusable {kind!r} record: {e}"))
            continue
        seen_any = True
    if summary is not None:
        recorded = max(recorded, summary["n_steps"])
        if len(data) < summary["log_bytes"]:
            short = f"the log ends {summary['log_bytes'] - len(data)} B before its summary says it did"
            if damage and damage[-1].end == len(data):
                last = damage.pop()
                damage.append(Damage(last.start, summary["log_bytes"], f"{last.reason}; {short}"))
            else:
                damage.append(Damage(len(data), summary["log_bytes"], f"truncated: {short}"))
    kept_to = index[-1] + 1 if index else 0
    if recorded > kept_to:
        lost.append((kept_to, recorded - 1))
    meta["length"] = len(index)
    out: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in scalars.items()}
    imgs: dict[str, np.ndarray] = {}
    acts: dict[str, np.ndarray] = {}
    for name, arrs in lists.items():
        stacked = np.stack(arrs)
        if name.startswith("img/"):
            imgs[name[4:]] = stacked
        elif name.startswith("act/"):
            acts[name[4:]] = stacked
        else:
            out[name] = stacked
    return Episode(
        episode_id,
        meta,
        complete,
        out,
        imgs,
        acts,
        steering,
        events,
        np.asarray(index, dtype=np.int64),
        damage,
        lost,
        info,
    )


def _count(n: Any) -> int:
    return n if type(n) is int and n >= 0 else 0


def _read_summary(path: Path) -> dict | None:
    """What the writer said when it closed the episode (steps recorded, log size), or None if it did not
    (a crash) or the summary is unreadable. The log is the truth; this only says what it should hold."""
    try:
        s = json.loads((path / SUMMARY).read_text())
        n, size = s["n_steps"], s["log_bytes"]
        if _count(n) != n or _count(size) != size:
            return None
        repaired = s.get("repaired")
        return {
            "n_steps": n,
            "log_bytes": size,
            "complete": s.get("complete") is True,
            "repaired": repaired if isinstance(repaired, dict) else None,
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _info_columns(info: Sequence[dict | None]) -> dict[str, list]:
    """`info_<key>` per scalar the policy's replies said (a planning policy's `info_plan`); None where a step's
    reply did not say it."""
    keys = dict.fromkeys(
        k for d in info if isinstance(d, dict) for k, v in d.items() if isinstance(v, (bool, int, float, str))
    )
    return {f"info_{k}": [d.get(k) if isinstance(d, dict) else None for d in info] for k in keys}


def _steering_columns(steering: Sequence[dict | None]) -> dict[str, list]:
    keys: dict[str, None] = {}
    for s in steering:
        for concept, setting in (s or {}).items():
            if isinstance(setting, dict):
                for k, v in setting.items():
                    if isinstance(v, (bool, int, float, str)) or v is None:
                        keys[f"steer_{concept}_{k}"] = None
    cols: dict[str, list] = {k: [] for k in keys}
    for s in steering:
        flat = {
            f"steer_{c}_{k}": v for c, st in (s or {}).items() if isinstance(st, dict) for k, v in st.items()
        }
        for k in keys:
            cols[k].append(flat.get(k))
    return cols
