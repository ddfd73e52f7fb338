"""Reading a store back: `open_store` -> `Store` (list, load, a pandas view), whatever state a crash left.

A `Store` never writes, so it can be opened while nodes are recording. Loading an episode decodes its log
record by record and stops at the first truncated or corrupt one, keeping everything before it
(`Episode.tail_error` says why it stopped). An episode's summary is only a cache: one that does not match
its log is ignored and the log is scanned instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.episode import Episode, EpisodeInfo
from vla_steer.core.rollouts.files import check_marker
from vla_steer.core.rollouts.format import ID_RE, LOG, MARKER, SUMMARY, BadRecord, decode_record


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
        """Every episode in id order. Closed ones come from their summary; others are scanned."""
        return [self.info(i) for i in self.episode_ids()]

    def info(self, episode_id: str) -> EpisodeInfo:
        path = self._path(episode_id)
        summary = _read_summary(path)
        if summary is not None:
            return EpisodeInfo(episode_id, path, summary["meta"], summary["n_steps"], summary["complete"])
        ep = self.load(episode_id, images=False, activations=False)
        return EpisodeInfo(episode_id, path, ep.meta, ep.n_steps, ep.complete)

    def load(self, episode_id: str, *, images: bool = True, activations: bool = True) -> Episode:
        """Read an episode back; everything up to the first bad record (see `Episode.tail_error`)."""
        path = self._path(episode_id)
        try:
            data = (path / LOG).read_bytes()
        except FileNotFoundError:
            data = b""
        return _parse(episode_id, data, images=images, activations=activations)

    def __len__(self) -> int:
        return len(self.episode_ids())

    def to_pandas(self) -> Any:
        """One row per step of every episode: ids, scalars, 1-D vectors as `<name>_<i>` columns and the
        steering state as `steer_<concept>_<key>`. Images, action chunks and activations stay in `load`."""
        import pandas as pd

        frames = []
        for episode_id in self.episode_ids():
            ep = self.load(episode_id, images=False, activations=False)
            if ep.n_steps == 0:
                continue
            cols: dict[str, Any] = {
                "episode": ep.id,
                "step": np.arange(ep.n_steps),
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


def _parse(episode_id: str, data: bytes, *, images: bool, activations: bool) -> Episode:
    meta: dict[str, Any] = {}
    complete, tail_error = False, None
    lists: dict[str, list[np.ndarray]] = {}
    steering: list[dict | None] = []
    events: list[dict] = []
    scalars: dict[str, list[float]] = {}
    schema: dict[str, tuple[str, tuple[int, ...]]] | None = None
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        try:
            header, arrays, end = decode_record(view, pos)
            kind = header.get("k")
            if pos == 0 and kind != "meta":
                raise BadRecord(f"the first record is {kind!r}, not 'meta'")
            if kind == "meta":
                meta = dict(header["meta"])
            elif kind == "step":
                table = {name: (a.dtype.name, a.shape) for name, a in arrays.items()}
                row = dict(header["scalars"])
                if schema is None:
                    schema, scalars = table, {k: [] for k in row}
                if table != schema or row.keys() != scalars.keys():
                    raise BadRecord(f"step {header.get('i')} does not match the episode's first step")
                if not all(isinstance(v, (int, float)) for v in row.values()):
                    raise BadRecord(f"step {header.get('i')} has non-numeric scalars")
                for name, a in arrays.items():
                    if (name.startswith("img/") and not images) or (
                        name.startswith("act/") and not activations
                    ):
                        continue
                    lists.setdefault(name, []).append(a)
                for k, v in row.items():
                    scalars[k].append(v)
                steering.append(header.get("steering"))
            elif kind == "event":
                events.append(dict(header["ev"]))
            elif kind == "end":
                complete = True
                meta.update(header.get("final") or {})
                meta["success"] = header.get("success")
        except (BadRecord, KeyError, TypeError, ValueError, AttributeError) as e:
            tail_error = f"at byte {pos} of {len(data)}: {e}"
            break
        pos = end
    if not data:
        tail_error = "empty log (the writer died before its first record)"
    n = len(steering)
    meta["length"] = n
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
    return Episode(episode_id, meta, complete, out, imgs, acts, steering, events, tail_error)


def _read_summary(path: Path) -> dict | None:
    """The summary if it is whole and matches the log; a stale or damaged one is ignored (scan instead)."""
    try:
        s = json.loads((path / SUMMARY).read_text())
        if (path / LOG).stat().st_size != s["log_bytes"]:
            return None
        if not isinstance(s["meta"], dict) or not isinstance(s["n_steps"], int):
            return None
        return {"meta": s["meta"], "n_steps": s["n_steps"], "complete": bool(s["complete"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
