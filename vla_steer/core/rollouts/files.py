"""Filesystem helpers of the store: its marker file, atomic JSON, directory fsync, the id-claiming lock."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vla_steer.core.rollouts.format import FORMAT_NAME, FORMAT_VERSION


def check_marker(marker: Path) -> None:
    """Refuse a directory that is not a store, or one written by a newer format version."""
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


def atomic_json(path: Path, obj: Any) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory's new entries durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock among processes on this machine, held on the file at `path`."""
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


def hold_log_lock(fd: int) -> None:
    """Mark a log as being written (an exclusive flock, dropped by the kernel when the writer's fd closes or
    its process dies), so `repair` never rewrites an episode a live writer is still appending to."""
    try:
        import fcntl
    except ImportError:
        return
    with contextlib.suppress(OSError):  # a filesystem without locks: record anyway, unprotected
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def is_being_written(log: Path) -> bool:
    """Whether a live writer holds `log`'s lock (see `hold_log_lock`)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(log, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
