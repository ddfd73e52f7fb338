"""Repairing a damaged episode log: rewrite it with every intact record, keep the original as a backup.

The new log holds the intact records byte for byte (nothing is re-encoded or invented: lost steps stay
lost, and the step indices still show where). It replaces the old one atomically: the original is first
hard-linked to `log.bin.damaged-<time>-<hex>`, then the new log is renamed over `log.bin`, so at every
moment `log.bin` is the old log or the new one. The summary is rewritten to match, keeping the number of
steps the episode had when recorded (so the listing still counts the lost ones) and what the repair did.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vla_steer.core.rollouts.damage import Damage, describe_lost, no_arrays, walk
from vla_steer.core.rollouts.files import atomic_json, fsync_dir, is_being_written
from vla_steer.core.rollouts.format import LOG, SUMMARY
from vla_steer.core.rollouts.reader import Store


@dataclass(frozen=True)
class Repair:
    """What `repair_episode` did to one episode."""

    id: str
    kept_records: int
    kept_steps: int
    kept_bytes: int
    dropped: tuple[Damage, ...]  # the byte ranges of the original log left out
    lost_steps: tuple[tuple[int, int], ...]  # recorded steps the episode no longer has (inclusive ranges)
    backup: Path  # the original log

    def describe(self) -> str:
        parts = [f"kept {self.kept_steps} steps ({self.kept_records} records, {self.kept_bytes} B)"]
        parts += [f"dropped {d}" for d in self.dropped]
        if self.lost_steps:
            parts.append(describe_lost(self.lost_steps))
        parts.append(f"original kept as {self.backup.name}")
        return "; ".join(parts)


def repair_episode(store: Store, episode_id: str) -> Repair | None:
    """Rewrite a damaged episode's log (see the module doc); None if its log has no damage to remove.
    Refuses (RuntimeError) an episode that a live writer is still recording."""
    info = store.info(episode_id)
    if not info.damage:
        return None
    log = info.path / LOG
    if is_being_written(log):
        raise RuntimeError(
            f"episode {episode_id} is being recorded right now; repair it once its writer ends"
        )
    data = log.read_bytes()
    unusable = {(d.start, d.end) for d in info.damage}  # intact records the reader cannot use go too
    records = [(item[0], item[3]) for item in walk(data, no_arrays) if not isinstance(item, Damage)]
    spans = [span for span in records if span not in unusable]
    kept = b"".join(data[a:b] for a, b in spans)

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    backup = log.with_name(f"{LOG}.damaged-{stamp}-{uuid.uuid4().hex[:6]}")
    tmp = log.with_name(f".{LOG}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(log, backup)
        except OSError:  # a filesystem without hard links: copy (log.bin is untouched until the rename)
            shutil.copy2(log, backup)
        os.replace(tmp, log)
        fsync_dir(info.path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

    # The new log holds the same usable records as the old one, so what the listing said about the old one
    # (meta, complete, steps held and lost) still holds; only the damage is gone.
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backup": backup.name,
        "dropped": [[d.start, d.end, d.reason] for d in info.damage],
        "lost_steps": [list(r) for r in info.lost_steps],
        "kept_steps": info.n_steps,
        "kept_records": len(spans),
    }
    previous = _previous_repairs(info.path)
    atomic_json(
        info.path / SUMMARY,
        {
            "id": episode_id,
            "meta": info.meta,
            "n_steps": info.n_steps + info.steps_lost,  # as recorded: the listing keeps counting lost ones
            "complete": info.complete,
            "log_bytes": len(kept),
            "repaired": {**record, "earlier": previous} if previous else record,
        },
    )
    return Repair(episode_id, len(spans), info.n_steps, len(kept), info.damage, info.lost_steps, backup)


def repair_store(store: Store) -> list[Repair]:
    """Repair every damaged episode of `store` (see `repair_episode`); the repairs done, in id order."""
    return [r for i in store.episode_ids() if (r := repair_episode(store, i)) is not None]


def _previous_repairs(path: Path) -> list[dict]:
    """Earlier repairs recorded in the summary (a second repair keeps the history of the first)."""
    try:
        old = json.loads((path / SUMMARY).read_text()).get("repaired")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(old, dict):
        return []
    earlier = old.pop("earlier", [])
    return [*(earlier if isinstance(earlier, list) else []), old]
