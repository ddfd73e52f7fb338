"""Writing episodes: `Recorder` claims episode ids under a store's root, `EpisodeWriter` appends one episode.

On disk::

    root/rollouts.json                      {"format": "vla-steer-rollouts", "version": 1}
    root/episodes/<NNNNNN>-<hex8>/log.bin   append-only framed records (the episode itself)
    root/episodes/<NNNNNN>-<hex8>/summary.json   written atomically when the episode is closed (a cache)

The first record is the episode's metadata, then steps and events as they happen, and an "end" record
when the episode ends normally. Each record reaches the OS with one `write` as soon as it is made, so a
SIGKILLed writer loses at most the record being written; `fsync` (for power loss) runs at most every
`FLUSH_INTERVAL_S` and at the end. Several recorders may share a root, even at once: an id is claimed
with an atomic mkdir under a lock.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.episode import EpisodeInfo
from vla_steer.core.rollouts.files import atomic_json, check_marker, fsync_dir, hold_log_lock, locked
from vla_steer.core.rollouts.format import (
    FINITE_CHECKED,
    FORMAT_NAME,
    FORMAT_VERSION,
    ID_RE,
    LOG,
    MARKER,
    SUMMARY,
    SchemaError,
    as_activation,
    as_image,
    as_scalar,
    as_vector,
    check_key,
    encode_record,
    field_name,
    plain,
)

FLUSH_INTERVAL_S = 1.0  # at most this long between fsyncs of an episode's log (power loss, not crashes)


class Recorder:
    """Creates episodes under `root` (made if missing). Several recorders may share a root, even at once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "episodes").mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if marker.exists():
            check_marker(marker)
        else:
            atomic_json(marker, {"format": FORMAT_NAME, "version": FORMAT_VERSION})

    def start_episode(self, meta: Mapping[str, Any]) -> EpisodeWriter:
        """Claim a new episode id and write its metadata record (fsynced) before returning."""
        meta = plain(dict(meta), "meta")
        return EpisodeWriter(self._claim(), meta)

    def _claim(self) -> Path:
        """mkdir is atomic; the lock keeps the counter unique among writers on this machine."""
        episodes = self.root / "episodes"
        with locked(self.root / ".claim.lock"):
            numbers = [int(m.group(1)) for p in episodes.iterdir() if (m := ID_RE.match(p.name))]
            n = max(numbers, default=-1) + 1
            while True:
                path = episodes / f"{n:06d}-{uuid.uuid4().hex[:8]}"
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    n += 1
            fsync_dir(episodes)
        return path


class EpisodeWriter:
    """Writes one episode as it happens, from any thread: steps and events, then `end` (complete) or
    `abort` (incomplete, as a crash would leave it; a writer dropped unclosed leaves it so too)."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.id = path.name
        self.meta = meta
        self.n_steps = 0
        self._schema: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._scalars: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._closed = False
        self._bytes = 0
        self._last_flush = time.monotonic()
        self._fd = os.open(
            path / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644
        )
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        hold_log_lock(self._fd)
        self._write({"k": "meta", "format": FORMAT_VERSION, "t": time.time(), "meta": meta}, {})
        self._flush()
        fsync_dir(path)

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
        policy_info: Mapping[str, Any] | None = None,
    ) -> int:
        """Record one control step and return its index. The first step fixes which fields an episode has
        and their dtypes and shapes; a later step that differs raises `SchemaError` naming the field."""
        arrays: dict[str, np.ndarray] = {}
        for what, d in (
            ("images", images), ("activations", activations), ("steering", steering), ("policy_info", policy_info)
        ):  # fmt: skip
            if d is not None and not isinstance(d, Mapping):
                raise SchemaError(what, f"expected a dict, got {type(d).__name__}")
        for key, img in (images or {}).items():
            arrays[f"img/{check_key(key, 'images')}"] = as_image(img, f"images[{key!r}]")
        for name, value in (
            ("state", state),
            ("ee_pos", ee_pos),
            ("ee_quat", ee_quat),
            ("ee_vel", ee_vel),
            ("action_chunk", action_chunk),
            ("action", action),
        ):
            if value is not None:
                arrays[name] = as_vector(value, name)
        for name, value in (activations or {}).items():
            arrays[f"act/{check_key(name, 'activations')}"] = as_activation(value, f"activations[{name!r}]")
        scalars = {"t_wall": time.time() if t_wall is None else as_scalar(t_wall, "t_wall")}
        if reward is not None:
            scalars["reward"] = as_scalar(reward, "reward")
        if t_sim is not None:
            scalars["t_sim"] = as_scalar(t_sim, "t_sim")
        steer = None if steering is None else plain(dict(steering), "steering")
        said = None if policy_info is None else plain(dict(policy_info), "policy_info")
        nonfinite = [n for n in FINITE_CHECKED if n in arrays and not np.isfinite(arrays[n]).all()]
        nonfinite += [n for n in ("reward", "t_sim") if n in scalars and not math.isfinite(scalars[n])]

        with self._lock:
            self._check_open()
            self._check_schema(arrays, scalars)
            i = self.n_steps
            header = {"k": "step", "i": i, "scalars": scalars, "steering": steer}
            if said is not None:
                header["info"] = said
            self._write(header, arrays)
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
        ev = {"t": time.time() if t is None else as_scalar(t, "t"), "kind": kind}
        ev.update(plain(data, f"event[{kind!r}]"))
        with self._lock:
            self._check_open()
            ev["step"] = self.n_steps
            self._write({"k": "event", "ev": ev}, {})
            self._maybe_flush()

    def end(self, success: bool | None = None, **final_meta: Any) -> EpisodeInfo:
        """Mark the episode complete, fsync and close it. `final_meta` is merged into the metadata."""
        if success is not None and not isinstance(success, (bool, np.bool_)):
            raise SchemaError("success", f"must be a bool or None, got {success!r}")
        final = plain(final_meta, "final_meta")
        with self._lock:
            self._check_open()
            ok = None if success is None else bool(success)
            self._write(
                {"k": "end", "t": time.time(), "success": ok, "n_steps": self.n_steps, "final": final}, {}
            )
            self.meta = {**self.meta, **final, "success": ok, "length": self.n_steps}
            self._close(complete=True)
        return EpisodeInfo(self.id, self.path, dict(self.meta), self.n_steps, complete=True)

    def abort(self, reason: str) -> None:
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
            raise SchemaError(field_name(name), "missing, but the episode's first step had it")
        for name in schema.keys() - self._schema.keys():
            raise SchemaError(
                field_name(name), "not in the episode's first step; every step needs the same fields"
            )
        for name, (dtype, shape) in schema.items():
            if (dtype, shape) != self._schema[name]:
                want = self._schema[name]
                raise SchemaError(
                    field_name(name),
                    f"{dtype} {shape} differs from the episode's first step: {want[0]} {want[1]}",
                )
        if tuple(sorted(scalars)) != self._scalars:
            diff = sorted(set(scalars) ^ set(self._scalars))
            raise SchemaError(diff[0], "given in some steps but not others")

    def _write(self, header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        record = encode_record(header, arrays)
        data = memoryview(record)
        try:
            while data:  # one write per record in practice; loop for the rare partial write
                data = data[os.write(self._fd, data) :]
        except BaseException:  # e.g. disk full: cut the torn record so later records stay readable
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._bytes)
                os.lseek(self._fd, self._bytes, os.SEEK_SET)
            raise
        self._bytes += len(record)

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self._flush()

    def _flush(self) -> None:
        """fsync what has been written (it already survives a killed process; this is for power loss)."""
        os.fsync(self._fd)
        self._last_flush = time.monotonic()

    def _close(self, complete: bool) -> None:
        self._flush()
        self._finalizer()
        self._closed = True
        summary = {
            "id": self.id,
            "meta": self.meta,
            "n_steps": self.n_steps,
            "complete": complete,
            "log_bytes": self._bytes,
        }
        atomic_json(self.path / SUMMARY, summary)
