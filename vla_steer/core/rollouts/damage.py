"""Finding every intact record in a damaged log: `walk` resynchronises after a bad record, `Damage` says where.

A corrupt or truncated record no longer ends the log: the walk searches for the next record magic from the
byte after the bad record's start and resumes at the first candidate that decodes (crc included), so a
flipped byte costs only the record that holds it. What could not be read comes back as `Damage` ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vla_steer.core.rollouts.format import MAGIC, BadRecord, decode_record

Record = tuple[int, dict, dict[str, np.ndarray], int]  # (start offset, header, arrays, end offset)


@dataclass(frozen=True)
class Damage:
    """Bytes [start, end) of a log that hold no usable record, and why."""

    start: int
    end: int
    reason: str

    def __str__(self) -> str:
        return f"bytes {self.start}-{self.end} ({self.end - self.start} B): {self.reason}"


def walk(data: bytes, keep: Callable[[str], bool] | None = None) -> Iterator[Record | Damage]:
    """Every intact record of `data` in order, with a `Damage` for each unreadable stretch between them."""
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        try:
            header, arrays, end = decode_record(view, pos, keep)
        except BadRecord as e:
            nxt = resync(data, pos + 1)
            yield Damage(pos, nxt, _reason(data, pos, nxt, str(e)))
            pos = nxt
            continue
        yield pos, header, arrays, end
        pos = end


def resync(data: bytes, start: int) -> int:
    """The offset of the first intact record at or after `start`, or len(data) if there is none."""
    view = memoryview(data)
    pos = data.find(MAGIC, start)
    while pos >= 0:
        try:
            decode_record(view, pos, keep=no_arrays)
            return pos
        except BadRecord:  # the magic inside array data, or another damaged record
            pos = data.find(MAGIC, pos + 1)
    return len(data)


def describe_lost(ranges: Sequence[tuple[int, int]]) -> str:
    """'3 steps lost (3, 40-41)' for inclusive step index ranges."""
    n = sum(b - a + 1 for a, b in ranges)
    where = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    return f"{n} step{'' if n == 1 else 's'} lost ({where})"


def _reason(data: bytes, start: int, end: int, error: str) -> str:
    if data.count(0, start, end) == end - start:
        return "zero-filled (blocks never written, as a power cut leaves them)"
    if end == len(data):
        return f"torn or corrupt tail ({error})"
    return error


def no_arrays(name: str) -> bool:
    return False
