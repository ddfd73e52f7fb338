"""The rollout store: every simulator/robot node writes its episodes here, every offline analysis reads them.

Torch-free on purpose (the LIBERO node writes rollouts from its own environment): the writer and reader need
only the standard library, numpy and msgpack. `Store.to_pandas` needs pandas; `export_lerobot` needs
pyarrow, pandas and PyAV (`av`, which ships its own ffmpeg). Nothing is ever pickled.

On disk::

    root/rollouts.json                      {"format": "vla-steer-rollouts", "version": 1}
    root/episodes/<NNNNNN>-<hex8>/log.bin   append-only framed records (the episode itself)
    root/episodes/<NNNNNN>-<hex8>/summary.json   written atomically when the episode is closed (a cache)

A record is a 20-byte prefix `<4sIQI` (magic b"VSR1", header length, body length, crc32 of header + body),
a msgpack header (`k`: "meta" | "step" | "event" | "end", plain values, and an `arrays` table of
`[name, dtype, shape]`), then the arrays' raw little-endian buffers back to back. The first record is the
episode's metadata, then steps and events as they happen, and an "end" record when the episode ends
normally. Each record reaches the OS with one `write` as soon as it is made, so a SIGKILLed writer loses at
most the record being written; `fsync` (for power loss) runs at most every `flush_interval_s` and at the
end. The reader stops at the first truncated or corrupt record and keeps everything before it, so the
store is readable whatever state a crash left it in.

Images are stored raw: two 224x224 RGB cameras are ~300 KB per step (~90 MB for a 300-step episode).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

FORMAT_NAME = "vla-steer-rollouts"
FORMAT_VERSION = 1
MARKER = "rollouts.json"
LOG = "log.bin"
SUMMARY = "summary.json"

_MAGIC = b"VSR1"
_PREFIX = struct.Struct("<4sIQI")
_MAX_HEADER = 64 * 1024 * 1024
_ID_RE = re.compile(r"^(\d{6,})-[0-9a-f]{8}$")
_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64"}
)
# Per-step array fields: name -> required shape (None: any, fixed by the episode's first step) and ndim.
_VECTORS: dict[str, tuple[tuple[int, ...] | None, int]] = {
    "state": (None, 1),
    "ee_pos": ((3,), 1),
    "ee_quat": ((4,), 1),
    "ee_vel": (None, 1),
    "action_chunk": (None, 2),
    "action": (None, 1),
}
_FINITE_CHECKED = ("action", "action_chunk", "state")


class SchemaError(ValueError):
    """A step or metadata value the store cannot record. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ----------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class EpisodeInfo:
    """What `Store.episodes` lists. `meta` holds the start metadata updated by `end()` (success, length)."""

    id: str
    path: Path
    meta: dict[str, Any]
    n_steps: int
    complete: bool

    @property
    def success(self) -> bool | None:
        return self.meta.get("success")


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


# ----------------------------------------------------------------------------------------------- writer


class Recorder:
    """Creates episodes under `root` (made if missing). Several recorders may share a root, even at once."""

    def __init__(self, root: str | os.PathLike, *, flush_interval_s: float | None = 1.0):
        self.root = Path(root)
        if flush_interval_s is not None and not flush_interval_s >= 0:
            raise ValueError(f"flush_interval_s must be >= 0 or None, got {flush_interval_s!r}")
        self.flush_interval_s = flush_interval_s
        (self.root / "episodes").mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if marker.exists():
            _check_marker(marker)
        else:
            _atomic_json(marker, {"format": FORMAT_NAME, "version": FORMAT_VERSION})

    def start_episode(self, meta: Mapping[str, Any] | None = None) -> EpisodeWriter:
        """Claim a new episode id and write its metadata record (fsynced) before returning."""
        meta = _plain(dict(meta or {}), "meta")
        path = self._claim()
        return EpisodeWriter(path, meta, self.flush_interval_s)

    def _claim(self) -> Path:
        """mkdir is atomic; the lock keeps the counter unique among writers on this machine."""
        episodes = self.root / "episodes"
        with _locked(self.root / ".claim.lock"):
            numbers = [int(m.group(1)) for p in episodes.iterdir() if (m := _ID_RE.match(p.name))]
            n = max(numbers, default=-1) + 1
            while True:
                path = episodes / f"{n:06d}-{uuid.uuid4().hex[:8]}"
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    n += 1
            _fsync_dir(episodes)
        return path


class EpisodeWriter:
    """Writes one episode as it happens. Use as a context manager: an exception inside leaves the episode
    incomplete (no "end" record) but readable; a clean exit without `end()` ends it with success None."""

    def __init__(self, path: Path, meta: dict[str, Any], flush_interval_s: float | None):
        self.path = path
        self.id = path.name
        self.meta = meta
        self.n_steps = 0
        self.flush_interval_s = flush_interval_s
        self._schema: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._scalars: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._closed = self._complete = False
        self._bytes = 0
        self._last_flush = time.monotonic()
        self._fd = os.open(
            path / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644
        )
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        self._write({"k": "meta", "format": FORMAT_VERSION, "t": time.time(), "meta": meta}, {})
        self.flush()
        _fsync_dir(path)

    # -- public API

    def step(
        self,
        *,
        images: Mapping[str, np.ndarray] | None = None,
        state: Any = None,
        ee_pos: Any = None,
        ee_quat: Any = None,
        ee_vel: Any = None,
        action_chunk: Any = None,
        action: Any = None,
        reward: float | None = None,
        t_wall: float | None = None,
        t_sim: float | None = None,
        steering: Mapping[str, Any] | None = None,
        activations: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Record one control step and return its index. The first step fixes which fields an episode has
        and their dtypes and shapes; a later step that differs raises `SchemaError` naming the field."""
        arrays: dict[str, np.ndarray] = {}
        for what, d in (("images", images), ("activations", activations), ("steering", steering)):
            if d is not None and not isinstance(d, Mapping):
                raise SchemaError(what, f"expected a dict, got {type(d).__name__}")
        for key, img in (images or {}).items():
            arrays[f"img/{_key(key, 'images')}"] = _image(img, f"images[{key!r}]")
        for name, value in (
            ("state", state),
            ("ee_pos", ee_pos),
            ("ee_quat", ee_quat),
            ("ee_vel", ee_vel),
            ("action_chunk", action_chunk),
            ("action", action),
        ):
            if value is not None:
                arrays[name] = _vector(value, name)
        for name, value in (activations or {}).items():
            arrays[f"act/{_key(name, 'activations')}"] = _activation(value, f"activations[{name!r}]")
        scalars = {"t_wall": time.time() if t_wall is None else _scalar(t_wall, "t_wall")}
        if reward is not None:
            scalars["reward"] = _scalar(reward, "reward")
        if t_sim is not None:
            scalars["t_sim"] = _scalar(t_sim, "t_sim")
        steer = None if steering is None else _plain(dict(steering), "steering")
        nonfinite = [n for n in _FINITE_CHECKED if n in arrays and not np.isfinite(arrays[n]).all()]
        nonfinite += [n for n in ("reward", "t_sim") if n in scalars and not math.isfinite(scalars[n])]

        with self._lock:
            self._check_open()
            self._check_schema(arrays, scalars)
            i = self.n_steps
            self._write({"k": "step", "i": i, "scalars": scalars, "steering": steer}, arrays)
            self.n_steps += 1
            if nonfinite:  # recorded as-is; the event lets the analysis find them without scanning
                self._write(
                    {
                        "k": "event",
                        "ev": {"t": scalars["t_wall"], "kind": "nonfinite", "step": i, "fields": nonfinite},
                    },
                    {},
                )
            self._maybe_flush()
        return i

    def event(self, kind: str, *, t: float | None = None, **data: Any) -> None:
        """Record a free-form event (e.g. a knob change) at wall time `t` (now by default). The writer adds
        `step`: the number of steps recorded so far, i.e. the event took effect from that step on."""
        if not isinstance(kind, str) or not kind:
            raise SchemaError("kind", f"an event kind must be a non-empty str, got {kind!r}")
        ev = {"t": time.time() if t is None else _scalar(t, "t"), "kind": kind}
        ev.update(_plain(data, f"event[{kind!r}]"))
        with self._lock:
            self._check_open()
            ev["step"] = self.n_steps
            self._write({"k": "event", "ev": ev}, {})
            self._maybe_flush()

    def end(self, success: bool | None = None, **final_meta: Any) -> EpisodeInfo:
        """Mark the episode complete, fsync and close it. `final_meta` is merged into the metadata."""
        if success is not None and not isinstance(success, (bool, np.bool_)):
            raise SchemaError("success", f"must be a bool or None, got {success!r}")
        final = _plain(final_meta, "final_meta")
        with self._lock:
            self._check_open()
            ok = None if success is None else bool(success)
            self._write(
                {"k": "end", "t": time.time(), "success": ok, "n_steps": self.n_steps, "final": final}, {}
            )
            self.meta = {**self.meta, **final, "success": ok, "length": self.n_steps}
            self._close(complete=True)
        return self.info

    def abort(self, reason: str = "aborted") -> None:
        """Close without an "end" record: the episode stays incomplete (what a crash would leave)."""
        with self._lock:
            if self._closed:
                return
            self._write(
                {
                    "k": "event",
                    "ev": {"t": time.time(), "kind": "abort", "step": self.n_steps, "reason": str(reason)},
                },
                {},
            )
            self.meta = {**self.meta, "length": self.n_steps}
            self._close(complete=False)

    def flush(self) -> None:
        """fsync what has been written (it already survives a killed process; this is for power loss)."""
        os.fsync(self._fd)
        self._last_flush = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def info(self) -> EpisodeInfo:
        return EpisodeInfo(self.id, self.path, dict(self.meta), self.n_steps, self._closed and self._complete)

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.end()
        else:
            self.abort(f"{exc_type.__name__}: {exc}")

    # -- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"episode {self.id} is closed")

    def _check_schema(self, arrays: dict[str, np.ndarray], scalars: dict[str, float]) -> None:
        schema = {k: (a.dtype.name, a.shape) for k, a in arrays.items()}
        if self._schema is None:
            self._schema, self._scalars = schema, tuple(sorted(scalars))
            return
        for name in self._schema.keys() - schema.keys():
            raise SchemaError(_field(name), "missing, but the episode's first step had it")
        for name in schema.keys() - self._schema.keys():
            raise SchemaError(
                _field(name), "not in the episode's first step; every step needs the same fields"
            )
        for name, (dtype, shape) in schema.items():
            if (dtype, shape) != self._schema[name]:
                want = self._schema[name]
                raise SchemaError(
                    _field(name),
                    f"{dtype} {shape} differs from the episode's first step: {want[0]} {want[1]}",
                )
        if tuple(sorted(scalars)) != self._scalars:
            diff = sorted(set(scalars) ^ set(self._scalars))
            raise SchemaError(diff[0], "given in some steps but not others")

    def _write(self, header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        table, bufs = [], []
        for name, a in arrays.items():
            table.append([name, a.dtype.name, list(a.shape)])
            bufs.append(a.reshape(-1).view(np.uint8))
        header["arrays"] = table
        head = msgpack.packb(header, use_bin_type=True)
        crc = zlib.crc32(head)
        for b in bufs:
            crc = zlib.crc32(b, crc)
        body = sum(b.nbytes for b in bufs)
        data = memoryview(b"".join([_PREFIX.pack(_MAGIC, len(head), body, crc), head, *bufs]))
        try:
            while data:  # one write per record in practice; loop for the rare partial write
                data = data[os.write(self._fd, data) :]
        except BaseException:  # e.g. disk full: cut the torn record so later records stay readable
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._bytes)
                os.lseek(self._fd, self._bytes, os.SEEK_SET)
            raise
        self._bytes += len(head) + body + _PREFIX.size

    def _maybe_flush(self) -> None:
        if self.flush_interval_s is not None and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _close(self, complete: bool) -> None:
        self.flush()
        self._finalizer()
        self._closed, self._complete = True, complete
        summary = {
            "id": self.id,
            "meta": self.meta,
            "n_steps": self.n_steps,
            "complete": complete,
            "log_bytes": self._bytes,
        }
        _atomic_json(self.path / SUMMARY, summary)


# ----------------------------------------------------------------------------------------------- reader


class Store:
    """Read access to a rollout store. Never writes, so it can be opened while nodes are recording."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        marker = self.root / MARKER
        if not marker.is_file():
            what = "does not exist" if not self.root.exists() else f"has no {MARKER} (not a rollout store)"
            raise FileNotFoundError(f"rollout store {str(self.root)!r} {what}")
        _check_marker(marker)

    def episode_ids(self) -> list[str]:
        d = self.root / "episodes"
        return (
            sorted(p.name for p in d.iterdir() if _ID_RE.match(p.name) and p.is_dir()) if d.is_dir() else []
        )

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

    def __iter__(self) -> Iterator[EpisodeInfo]:
        return iter(self.episodes())

    def __len__(self) -> int:
        return len(self.episode_ids())

    def to_pandas(self, *, complete_only: bool = False) -> Any:
        """One row per step of every episode: ids, scalars, 1-D vectors as `<name>_<i>` columns and the
        steering state as `steer_<concept>_<key>`. Images, action chunks and activations stay in `load`."""
        import pandas as pd

        frames = []
        for episode_id in self.episode_ids():
            ep = self.load(episode_id, images=False, activations=False)
            if ep.n_steps == 0 or (complete_only and not ep.complete):
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
        if not isinstance(episode_id, str) or not _ID_RE.match(episode_id):
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
            header, arrays, end = _record(view, pos)
            kind = header.get("k")
            if pos == 0 and kind != "meta":
                raise _BadRecord(f"the first record is {kind!r}, not 'meta'")
            if kind == "meta":
                meta = dict(header["meta"])
            elif kind == "step":
                table = {name: (a.dtype.name, a.shape) for name, a in arrays.items()}
                row = dict(header["scalars"])
                if schema is None:
                    schema, scalars = table, {k: [] for k in row}
                if table != schema or row.keys() != scalars.keys():
                    raise _BadRecord(f"step {header.get('i')} does not match the episode's first step")
                if not all(isinstance(v, (int, float)) for v in row.values()):
                    raise _BadRecord(f"step {header.get('i')} has non-numeric scalars")
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
        except (_BadRecord, KeyError, TypeError, ValueError, AttributeError) as e:
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


class _BadRecord(Exception):
    pass


def _record(view: memoryview, pos: int) -> tuple[dict, dict[str, np.ndarray], int]:
    """Decode the record at `pos`: (header, arrays as views into `view`, end offset) or raise _BadRecord."""
    size = len(view)
    if size - pos < _PREFIX.size:
        raise _BadRecord("truncated record prefix")
    magic, hlen, blen, crc = _PREFIX.unpack_from(view, pos)
    if magic != _MAGIC:
        raise _BadRecord("bad magic")
    start = pos + _PREFIX.size
    end = start + hlen + blen
    if hlen > _MAX_HEADER or end > size:
        raise _BadRecord("truncated record")
    head, body = view[start : start + hlen], view[start + hlen : end]
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        raise _BadRecord("crc mismatch")
    try:
        header = msgpack.unpackb(head, raw=False, ext_hook=_no_ext, strict_map_key=True)
    except Exception as e:  # any msgpack failure means a corrupt record, whatever its class
        raise _BadRecord(f"bad header: {e}") from None
    table = header.get("arrays") if isinstance(header, dict) else None
    if not isinstance(table, list):
        raise _BadRecord("header has no array table")
    arrays, off = {}, 0
    for entry in table:
        try:
            name, dtype_name, shape = entry
            if dtype_name not in _DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(entry)
            dtype = np.dtype(dtype_name).newbyteorder("<")
            count = math.prod(shape)
            arr = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape)
        except (ValueError, TypeError) as e:
            raise _BadRecord(f"bad array entry {entry!r}: {e}") from None
        arrays[str(name)] = arr
        off += count * dtype.itemsize
    if off != blen:
        raise _BadRecord("array table does not cover the body")
    return header, arrays, end


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


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


# ----------------------------------------------------------------------------------------------- export


def export_lerobot(
    store: Store | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fps: int,
    episodes: Sequence[str] | None = None,
    include_incomplete: bool = False,
    robot_type: str | None = None,
    vcodec: str = "libx264",
    crf: int = 18,
) -> Path:
    """Write the store (or the chosen episodes) as a LeRobot v3.0 dataset at `out_dir` (must be empty).

    One data parquet, one episodes parquet and one mp4 per camera (`observation.images.<key>`), all
    episodes back to back. `timestamp` is `frame_index / fps`, which is what LeRobot's video lookup needs;
    the recorded wall and sim times stay in the store. Requires pyarrow, pandas and av.
    """
    store = store if isinstance(store, Store) else open_store(store)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive int (LeRobot stores it as one), got {fps!r}")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {str(out)!r} is not empty")
    ids = list(episodes) if episodes is not None else store.episode_ids()
    infos = [store.info(i) for i in ids]
    chosen = [i for i in infos if i.n_steps > 0 and (include_incomplete or i.complete)]
    if not chosen:
        raise ValueError(f"no {'' if include_incomplete else 'complete '}episodes with steps to export")

    # Build next to the target and rename at the end: a failed export leaves nothing half-written behind.
    work = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    try:
        _write_lerobot(
            store, [i.id for i in chosen], work, fps=fps, robot_type=robot_type, vcodec=vcodec, crf=crf
        )
        os.replace(work, out)  # out is absent or an empty directory
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _write_lerobot(
    store: Store, ids: list[str], work: Path, *, fps: int, robot_type: str | None, vcodec: str, crf: int
) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = store.load(ids[0], activations=False)
    for name in ("state", "action"):
        if name not in first.arrays:
            raise SchemaError(name, f"episode {first.id} has no {name!r}; LeRobot needs it")
    state_dim, action_dim = first.arrays["state"].shape[1], first.arrays["action"].shape[1]
    cams = {k: v.shape[1:] for k, v in first.images.items()}
    for k, shape in cams.items():
        if shape[2] != 3:
            raise SchemaError(f"images[{k!r}]", f"only RGB (H, W, 3) can be exported, got {shape}")
    conv = first.meta.get("conventions") or {}
    features: dict[str, dict] = {
        "observation.state": {
            "dtype": "float32",
            "shape": [state_dim],
            "names": _names(conv.get("state_names"), "state", state_dim),
        },
        "action": {
            "dtype": "float32",
            "shape": [action_dim],
            "names": _names(conv.get("action_names"), "action", action_dim),
        },
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
    }
    video_keys = {k: f"observation.images.{k}" for k in cams}
    for k, key in video_keys.items():
        h, w, c = (int(d) for d in cams[k])
        features[key] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"]}
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1], "names": None}

    data_path = work / "data/chunk-000/file-000.parquet"
    data_path.parent.mkdir(parents=True)
    videos = {
        k: _VideoWriter(work / f"videos/{key}/chunk-000/file-000.mp4", cams[k], fps, vcodec, crf)
        for k, key in video_keys.items()
    }
    tasks: dict[str, int] = {}
    ep_rows: list[tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], str, Any]] = []
    writer = None
    total = 0
    try:
        for e, episode_id in enumerate(ids):
            ep, first = (first, None) if e == 0 else (store.load(episode_id, activations=False), None)
            t = ep.n_steps
            for name, want in (("state", state_dim), ("action", action_dim)):
                got = ep.arrays.get(name)
                if got is None or got.shape[1] != want:
                    raise SchemaError(
                        name,
                        f"episode {ep.id} has {None if got is None else got.shape[1:]}, "
                        f"the first exported episode has ({want},)",
                    )
            if set(ep.images) != set(cams) or any(ep.images[k].shape[1:] != cams[k] for k in cams):
                raise SchemaError(
                    "images",
                    f"episode {ep.id} has cameras "
                    f"{ {k: v.shape[1:] for k, v in ep.images.items()} }, expected {cams}",
                )
            task = str(ep.meta.get("instruction") or ep.meta.get("task") or "")
            task_index = tasks.setdefault(task, len(tasks))
            success = bool(ep.meta.get("success"))
            done = np.zeros(t, bool)
            done[-1] = True
            cols = {
                "observation.state": ep.arrays["state"].astype(np.float32),
                "action": ep.arrays["action"].astype(np.float32),
                "next.reward": ep.arrays.get("reward", np.zeros(t)).astype(np.float32),
                "next.done": done,
                "next.success": done & success,
                "timestamp": (np.arange(t) / fps).astype(np.float32),
                "frame_index": np.arange(t, dtype=np.int64),
                "episode_index": np.full(t, e, np.int64),
                "index": np.arange(total, total + t, dtype=np.int64),
                "task_index": np.full(t, task_index, np.int64),
            }
            table = pa.table({k: _arrow(v, pa) for k, v in cols.items()})
            if writer is None:
                writer = pq.ParquetWriter(data_path, table.schema, compression="snappy")
            writer.write_table(table)
            row: dict[str, Any] = {
                "episode_index": e,
                "tasks": [task],
                "length": t,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": total,
                "dataset_to_index": total + t,
            }
            for k, key in video_keys.items():
                start = videos[k].n_frames / fps
                videos[k].write(ep.images[k])
                row.update(
                    {
                        f"videos/{key}/chunk_index": 0,
                        f"videos/{key}/file_index": 0,
                        f"videos/{key}/from_timestamp": start,
                        f"videos/{key}/to_timestamp": videos[k].n_frames / fps,
                    }
                )
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            stats = {k: _stats(v) for k, v in cols.items()}
            stats.update({video_keys[k]: _image_stats(ep.images[k]) for k in cams})
            ep_rows.append((row, stats, ep.id, ep.meta.get("success")))
            total += t
    finally:
        if writer is not None:
            writer.close()
        for v in videos.values():
            v.close()

    for k, key in video_keys.items():
        features[key]["info"] = videos[k].info()
    all_stats = {name: _aggregate([s[name] for _, s, _, _ in ep_rows]) for name in ep_rows[0][1]}
    rows = []
    for row, stats, ep_id, success in ep_rows:
        row = dict(row)
        for name, st in stats.items():
            for s, v in st.items():
                row[f"stats/{name}/{s}"] = v.tolist()
        row["vla_steer/episode_id"] = ep_id
        row["vla_steer/success"] = success
        rows.append(row)
    ep_path = work / "meta/episodes/chunk-000/file-000.parquet"
    ep_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), ep_path)
    task_df = pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task"))
    task_df.to_parquet(work / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": robot_type,
        "total_episodes": len(ids),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(ids)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        if cams
        else None,
        "features": features,
    }
    (work / "meta/info.json").write_text(json.dumps(info, indent=4))
    stats_json = {name: {s: v.tolist() for s, v in st.items()} for name, st in all_stats.items()}
    (work / "meta/stats.json").write_text(json.dumps(stats_json, indent=4))


_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def _stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics over the frame axis (each shaped like one frame's value)."""
    x = values.astype(np.float64).reshape(len(values), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    out.update({k: np.quantile(x, q, axis=0) for k, q in _QUANTILES.items()})
    return out


def _image_stats(frames: np.ndarray, max_frames: int = 100, max_side: int = 64) -> dict[str, np.ndarray]:
    """Per-channel stats in [0, 1] shaped (3, 1, 1) like LeRobot's, on a subsample (quantiles sort)."""
    idx = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
    step = max(1, -(-max(frames.shape[1:3]) // max_side))
    px = frames[idx, ::step, ::step].reshape(-1, 3).astype(np.float64) / 255.0
    st = _stats(px)
    st = {k: v.reshape(3, 1, 1) if k != "count" else v for k, v in st.items()}
    st["count"] = np.array([len(idx)])
    return st


def _aggregate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool per-episode stats: exact min/max/mean/std, count-weighted quantiles (as LeRobot does)."""
    n = np.array([p["count"][0] for p in parts], dtype=np.float64)
    w = (n / n.sum()).reshape(-1, *([1] * parts[0]["mean"].ndim))
    mean = sum(wi * p["mean"] for wi, p in zip(w, parts, strict=True))
    var = sum(wi * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for wi, p in zip(w, parts, strict=True))
    out = {
        "min": np.min([p["min"] for p in parts], axis=0),
        "max": np.max([p["max"] for p in parts], axis=0),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(n.sum())]),
    }
    out.update({k: sum(wi * p[k] for wi, p in zip(w, parts, strict=True)) for k in _QUANTILES})
    return out


def _arrow(v: np.ndarray, pa: Any) -> Any:
    if v.ndim == 1:
        return pa.array(v)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def _names(given: Any, prefix: str, n: int) -> list[str]:
    if isinstance(given, (list, tuple)) and len(given) == n and all(isinstance(g, str) for g in given):
        return list(given)
    return [f"{prefix}_{i}" for i in range(n)]


def write_video(
    store: Store | str | os.PathLike, episode_id: str, camera: str, path: str | os.PathLike, *, fps: int = 20
) -> Path:
    """One episode's frames from one camera as an mp4 (needs PyAV)."""
    store = store if isinstance(store, Store) else open_store(store)
    ep = store.load(episode_id, activations=False)
    if camera not in ep.images:
        raise KeyError(f"episode {episode_id} has no camera {camera!r} (cameras: {sorted(ep.images)})")
    frames = ep.images[camera]
    writer = _VideoWriter(Path(path), frames.shape[1:], fps, "libx264", 23)
    try:
        writer.write(frames)
    finally:
        writer.close()
    return Path(path)


class _VideoWriter:
    """One mp4 per camera, episodes appended back to back; frame i has pts i at time base 1/fps."""

    def __init__(self, path: Path, shape: tuple[int, ...], fps: int, vcodec: str, crf: int):
        import av

        self._av = av
        path.parent.mkdir(parents=True, exist_ok=True)
        self.h, self.w = int(shape[0]), int(shape[1])
        self.fps = fps
        self.n_frames = 0
        self.pix_fmt = "yuv420p" if self.h % 2 == 0 and self.w % 2 == 0 else "yuv444p"
        self.container = av.open(str(path), mode="w")
        opts = {"crf": str(crf), "g": "2"} if vcodec in ("libx264", "libsvtav1") else {"g": "2"}
        self.stream = self.container.add_stream(vcodec, rate=fps, options=opts)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.w, self.h, self.pix_fmt
        self.codec = self.stream.codec_context.codec.canonical_name  # type: ignore[union-attr]
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        from fractions import Fraction

        for img in frames:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts, vf.time_base = self.n_frames, Fraction(1, self.fps)
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.n_frames += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # an error path: the export is failing anyway
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def info(self) -> dict[str, Any]:
        return {
            "video.height": self.h,
            "video.width": self.w,
            "video.codec": self.codec,
            "video.pix_fmt": self.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": self.fps,
            "video.channels": 3,
            "has_audio": False,
        }


# ----------------------------------------------------------------------------------------------- helpers


def _field(name: str) -> str:
    if name.startswith("img/"):
        return f"images[{name[4:]!r}]"
    if name.startswith("act/"):
        return f"activations[{name[4:]!r}]"
    return name


def _key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise SchemaError(what, f"keys must be non-empty str, got {key!r}")
    return key


def _array(value: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise SchemaError(name, f"not an array: {e}") from None
    if a.dtype.name not in _DTYPES:
        raise SchemaError(name, f"dtype {a.dtype} is not numeric (allowed: {', '.join(sorted(_DTYPES))})")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def _vector(value: Any, name: str) -> np.ndarray:
    a = _array(value, name)
    shape, ndim = _VECTORS[name]
    if a.ndim != ndim or (shape is not None and a.shape != shape):
        want = shape if shape is not None else f"{ndim}-D"
        raise SchemaError(name, f"expected shape {want}, got {a.shape}")
    return a


def _image(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise SchemaError(name, f"expected a uint8 (H, W, 3) array, got {got}")
    return np.ascontiguousarray(value)


def _activation(value: Any, name: str) -> np.ndarray:
    a = _array(value, name)
    if a.dtype.kind != "f":
        raise SchemaError(name, f"activations must be floating point, got {a.dtype}")
    return a


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.size != 1):
        raise SchemaError(name, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SchemaError(name, f"expected a number, got {value!r}") from None


def _plain(obj: Any, path: str) -> Any:
    """A JSON/msgpack-safe copy: numpy scalars and small arrays become Python values; junk is refused."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _DTYPES:
            raise SchemaError(path, f"array of dtype {obj.dtype} is not allowed here")
        return obj.tolist()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"keys must be str, got {k!r}")
            out[k] = _plain(v, f"{path}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    raise SchemaError(path, f"{type(obj).__name__} cannot be stored (use plain values or numpy arrays)")


def _check_marker(marker: Path) -> None:
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(marker)!r} is not a readable rollout store marker: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(marker)!r} does not describe a {FORMAT_NAME} store")
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        raise ValueError(
            f"{str(marker)!r} has format version {m.get('version')!r}; this code reads up to {FORMAT_VERSION}"
        )


def _atomic_json(path: Path, obj: Any) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the random suffix still keeps ids unique
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


__all__ = [
    "Episode",
    "EpisodeInfo",
    "EpisodeWriter",
    "Recorder",
    "SchemaError",
    "Store",
    "export_lerobot",
    "open_store",
]
