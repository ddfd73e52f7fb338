"""Rollout writer: episodes and events as written, crash safety (SIGKILL, a failed write), id claims."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from rollout_steps import assert_steps_equal, make_step, record

from vla_steer.core.rollouts import Recorder, open_store, writer
from vla_steer.core.rollouts.format import LOG


def test_abort_leaves_an_incomplete_episode_and_a_closed_writer_refuses_steps(tmp_path):
    rec = Recorder(tmp_path)
    rng = np.random.default_rng(0)
    bad = rec.start_episode({"task": "x"})
    bad.step(**make_step(0, rng))
    bad.abort("RuntimeError: sim exploded")
    bad.abort("again")  # closed already: nothing more is written
    ok = rec.start_episode({"task": "y"})
    ok.step(**make_step(0, rng))
    assert ok.end().complete
    open_ = rec.start_episode({"task": "z"})
    open_.step(**make_step(0, rng))
    store = open_store(tmp_path)
    assert store.n_closed() == 1  # the count for progress: neither the aborted nor the open episode
    aborted, ended, _ = store.episodes()
    assert not aborted.complete and aborted.n_steps == 1 and aborted.meta["length"] == 1
    assert ended.complete and ended.meta["success"] is None
    events = store.load(aborted.id).events
    assert [e["kind"] for e in events] == ["abort"] and events[0]["reason"] == "RuntimeError: sim exploded"
    for closed in (bad, ok):
        with pytest.raises(RuntimeError, match="closed"):
            closed.step(**make_step(1, rng))
    open_.end()
    assert store.n_closed() == 2


# ----------------------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from vla_steer.core.rollouts import Recorder
    ep = Recorder(sys.argv[1]).start_episode({"task": "kill me"})
    progress = open(sys.argv[2], "w")
    i = 0
    while True:
        ep.step(images={"cam": np.full((48, 64, 3), i % 256, np.uint8)}, state=np.full(7, i, np.float64),
                action=np.full(7, i, np.float32), reward=float(i), steering={"fast": {"strength": float(i)}})
        progress.write(f"{i}\\n")
        progress.flush()
        i += 1
        time.sleep(0.002)
    """
)


def test_sigkill_mid_episode_keeps_what_was_written(tmp_path):
    root, progress = tmp_path / "store", tmp_path / "progress.txt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(progress)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_lines(progress)) < 50:
            assert child.poll() is None, "the recording child died on its own"
            time.sleep(0.05)
        time.sleep(0.5)  # let it write on: the kill lands wherever it is, between fsyncs or not
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    done = len(_lines(progress))  # steps whose step() had returned when the child died
    assert done >= 50

    (info,) = open_store(root).episodes()
    assert not info.complete and info.meta["task"] == "kill me"
    ep = open_store(root).load(info.id)
    # Every record goes to the OS when it is made, so a SIGKILL loses at most the step being written
    # (far tighter than the flush interval's bound, which is for power loss).
    assert done <= ep.n_steps <= done + 1
    i = np.arange(ep.n_steps)
    np.testing.assert_array_equal(ep.arrays["state"], np.repeat(i[:, None], 7, 1).astype(np.float64))
    np.testing.assert_array_equal(ep.arrays["action"], np.repeat(i[:, None], 7, 1).astype(np.float32))
    np.testing.assert_array_equal(ep.arrays["reward"], i)
    np.testing.assert_array_equal(ep.images["cam"][:, 0, 0, 0], (i % 256).astype(np.uint8))
    assert [s["fast"]["strength"] for s in ep.steering] == i.tolist()


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().split("\n")[:-1]]  # the last line may be half-written
    except FileNotFoundError:
        return []


def test_flush_is_rate_limited(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "FLUSH_INTERVAL_S", 60.0)
    ep = Recorder(tmp_path).start_episode({})
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    rng = np.random.default_rng(0)
    for i in range(20):
        ep.step(**make_step(i, rng))
    assert calls == []
    ep.end()
    assert calls  # the end is always made durable


def test_second_recorder_appends(tmp_path):
    first = [record(tmp_path, 3, seed=s)[0] for s in range(2)]
    digests = {i: hashlib.sha256((tmp_path / "episodes" / i / LOG).read_bytes()).hexdigest() for i in first}
    later = [record(tmp_path, 2, seed=s)[0] for s in range(2, 4)]  # a new Recorder each time
    ids = open_store(tmp_path).episode_ids()
    assert ids == first + later and len(set(ids)) == 4
    assert [int(i.split("-")[0]) for i in ids] == [0, 1, 2, 3]
    for i, d in digests.items():
        assert hashlib.sha256((tmp_path / "episodes" / i / LOG).read_bytes()).hexdigest() == d
    assert [e.n_steps for e in open_store(tmp_path).episodes()] == [3, 3, 2, 2]


# ------------------------------------------------------------------------------------ writer edge cases


def test_failed_write_is_cut_so_later_records_stay_readable(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    steps = [make_step(i, rng) for i in range(3)]
    ep = Recorder(tmp_path).start_episode({})
    ep.step(**steps[0])
    real = os.write

    def half_then_fail(fd, data):  # a disk that fills up in the middle of a record
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        ep.step(**steps[1])
    monkeypatch.setattr(os, "write", real)
    ep.step(**steps[1])
    ep.step(**steps[2])
    ep.end(success=True)
    back = open_store(tmp_path).load(ep.id)
    assert back.complete and back.damage == []
    assert_steps_equal(back, steps)


def test_concurrent_claims_get_distinct_counters(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    Recorder(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        writers = list(pool.map(lambda _: Recorder(tmp_path).start_episode({}), range(16)))
    for w in writers:
        w.end()
    ids = open_store(tmp_path).episode_ids()
    assert len(ids) == 16 and sorted(int(i[:6]) for i in ids) == list(range(16))
