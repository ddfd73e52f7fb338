"""Runs a grid's cells on worker slots, with progress for the whole grid, and says how it went.

A slot runs one cell at a time and reports its episodes as they finish: locally a `LocalSlot` (worker
subprocesses, `sim.worker`), on Ray a slot driving a Ray actor (`sim.ray_grid`). Each slot pulls the next
cell from one queue (in grid order: task-major, so a worker keeps its environment), so N slots balance
themselves. The first failure (or Ctrl-C) stops the grid: the other slots stop at their next finished
episode (the one their worker has begun then stays incomplete, as a kill leaves it: a rerun redoes it), and
the failure is raised (`WorkerFailed`, its exit code). Progress goes to stderr: episodes done /
total (those done in earlier runs count as done), elapsed time and an ETA from this run's rate.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TextIO

from sim.grid import Cell
from sim.worker import WorkerFailed, WorkerProcess


class Slot(Protocol):
    def run(self, cell: Cell) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


class LocalSlot:
    """A worker subprocess of the cell's kind (robosuite or LIBERO), replaced when the kind changes."""

    def __init__(self, run: Mapping[str, Any]):
        self.spec = dict(run)
        self.worker: WorkerProcess | None = None
        self.closed = False

    def run(self, cell: Cell) -> Iterator[dict[str, Any]]:
        if self.closed:  # closed before this cell began: spawn nothing
            return
        if self.worker is None or self.worker.kind != cell.task.kind:
            self._end_worker()
            # Held before it is ready: `close` from another thread (Ctrl-C) kills a starting worker too.
            self.worker = WorkerProcess(cell.task.kind, self.spec)
            if self.closed:  # closed while it was being spawned
                self._end_worker()
                return
        yield from self.worker.run(cell.as_dict())

    def close(self) -> None:
        self.closed = True
        self._end_worker()

    def _end_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()


class Progress:
    """Episodes done / total for the whole grid, on a stream (stderr), one line per finished episode."""

    def __init__(self, total: int, done: int, stream: TextIO | None = None):
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def episode(self, event: Mapping[str, Any]) -> None:
        with self.lock:
            self.done += 1
            elapsed = time.monotonic() - self.t0
            ran = self.done - self.start_done
            eta = elapsed / ran * (self.total - self.done)
            ok = "success" if event.get("success") else "no success"
            print(
                f"grid: {self.done}/{self.total} episodes ({self.done / max(1, self.total):.0%}), "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}  [{event['task']} {event['setting']} "
                f"seed {event['seed']}: {ok}, {event['steps']:.0f} steps]",
                file=self.stream,
                flush=True,
            )


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_cells(cells: Sequence[Cell], slots: Sequence[Slot], progress: Progress) -> None:
    """Run every cell on the slots (one thread each); raises the first WorkerFailed. Slots are closed after."""
    todo: queue.SimpleQueue[Cell] = queue.SimpleQueue()
    for c in cells:
        todo.put(c)
    failures: list[BaseException] = []
    stop = threading.Event()

    ended = [threading.Event() for _ in slots]

    def drive(slot: Slot, ended: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    cell = todo.get_nowait()
                except queue.Empty:
                    return
                for event in slot.run(cell):
                    if event["event"] == "episode":
                        progress.episode(event)
                    if stop.is_set():
                        break
        except BaseException as e:  # handed to the caller
            if not stop.is_set():
                failures.append(e)
            stop.set()
        finally:
            slot.close()
            ended.set()

    threads = [
        threading.Thread(target=drive, args=(s, e), name=f"grid-slot-{i}", daemon=True)
        for i, (s, e) in enumerate(zip(slots, ended, strict=True))
    ]
    # Waited for through events, not Thread.join: on Python 3.11 a Ctrl-C that interrupts a join marks the
    # still-running thread as stopped, and every later join returns at once.
    try:  # the starts too: a Ctrl-C between two of them must still end the ones begun
        for t in threads:
            t.start()
        for e in ended:
            while not e.wait(0.2):  # short waits: Ctrl-C reaches this thread
                pass
    except BaseException:
        stop.set()  # a slot thread not yet running ends at its first check
        for s in slots:  # kill the workers now (starting ones too); their open episodes stay incomplete
            s.close()
        deadline = time.monotonic() + 30
        for t, e in zip(threads, ended, strict=True):
            if t.ident is not None:  # started: it ends as its worker's pipe closes
                e.wait(max(0.0, deadline - time.monotonic()))
        raise
    if failures:
        first = failures[0]
        raise (
            first if isinstance(first, WorkerFailed) else WorkerFailed(f"{type(first).__name__}: {first}", 4)
        )


def local_slots(n: int, run: Mapping[str, Any]) -> list[Slot]:
    return [LocalSlot(run) for _ in range(n)]
