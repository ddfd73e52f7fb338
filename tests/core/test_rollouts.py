"""Rollout store: round trips, crash safety (SIGKILL, torn and corrupted logs), appends, LeRobot export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vla_steer.core import rollouts
from vla_steer.core.rollouts import LOG, Recorder, SchemaError, export_lerobot, open_store

STEER = {"fast": {"mode": "clamp", "strength": 4.0, "enabled": True, "layers": [15, 16]}}


def make_step(i: int, rng: np.random.Generator, *, cams=("agentview", "wrist")) -> dict:
    """Every field, with values derived from `i` so any step can be checked on its own."""
    return {
        "images": {c: rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for c in cams},
        "state": rng.standard_normal(8),
        "ee_pos": rng.standard_normal(3).astype(np.float32),
        "ee_quat": rng.standard_normal(4),
        "ee_vel": rng.standard_normal(6),
        "action_chunk": rng.standard_normal((5, 7)).astype(np.float32),
        "action": rng.standard_normal(7).astype(np.float32),
        "reward": float(i) * 0.5,
        "t_wall": 1_700_000_000.0 + i * 0.1,
        "t_sim": i * 0.05,
        "steering": {"fast": {**STEER["fast"], "strength": float(i)}},
        "activations": {
            "fast": rng.standard_normal(12).astype(np.float32),
            "layer:15": rng.standard_normal((2, 3)).astype(np.float32),
        },
    }


def record(root: Path, n_steps: int, seed: int, *, end: bool = True, **meta) -> tuple[str, list[dict]]:
    rng = np.random.default_rng(seed)
    ep = Recorder(root).start_episode({"task": "libero_10/0", "instruction": "put the bowl away", **meta})
    steps = [make_step(i, rng) for i in range(n_steps)]
    for i, s in enumerate(steps):
        ep.step(**s)
        if i == 1:
            ep.event("knobs", t=123.0, op="set", strengths={"fast": 8.0})
    if end:
        ep.end(success=bool(seed % 2), final_note="done")
    return ep.id, steps


def assert_steps_equal(ep: rollouts.Episode, steps: list[dict]) -> None:
    """Bit-exact: dtypes kept, values equal (no float round trip through text or casts)."""
    assert ep.n_steps == len(steps)
    if not steps:
        assert ep.arrays == {} and ep.images == {} and ep.steering == []
        return
    for name in ("state", "ee_pos", "ee_quat", "ee_vel", "action_chunk", "action"):
        want = np.stack([s[name] for s in steps])
        assert ep.arrays[name].dtype == want.dtype, name
        np.testing.assert_array_equal(ep.arrays[name], want)
    for name in ("reward", "t_wall", "t_sim"):
        np.testing.assert_array_equal(ep.arrays[name], [s[name] for s in steps])
    for cam in steps[0]["images"]:
        np.testing.assert_array_equal(ep.images[cam], np.stack([s["images"][cam] for s in steps]))
    for name in steps[0]["activations"]:
        np.testing.assert_array_equal(ep.activations[name], np.stack([s["activations"][name] for s in steps]))
    assert ep.steering == [s["steering"] for s in steps]


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_two_episodes(tmp_path):
    id0, steps0 = record(tmp_path, 6, seed=0)
    id1, steps1 = record(tmp_path, 4, seed=1, policy="tiny_vla", policy_fingerprint="abc")
    store = open_store(tmp_path)
    infos = store.episodes()
    assert [i.id for i in infos] == [id0, id1]
    assert [i.n_steps for i in infos] == [6, 4]
    assert all(i.complete for i in infos)
    assert infos[1].success is True and infos[0].success is False
    assert infos[1].meta["policy_fingerprint"] == "abc" and infos[1].meta["final_note"] == "done"
    assert infos[1].meta["length"] == 4

    for ep_id, steps in ((id0, steps0), (id1, steps1)):
        ep = store.load(ep_id)
        assert ep.complete and ep.tail_error is None
        assert_steps_equal(ep, steps)
        knobs = [e for e in ep.events if e["kind"] == "knobs"]
        assert knobs == [{"t": 123.0, "kind": "knobs", "op": "set", "strengths": {"fast": 8.0}, "step": 2}]

    light = store.load(id0, images=False, activations=False)
    assert light.images == {} and light.activations == {} and light.n_steps == 6


def test_to_pandas(tmp_path):
    pytest.importorskip("pandas")
    record(tmp_path, 6, seed=0)
    record(tmp_path, 4, seed=1, end=False)
    df = open_store(tmp_path).to_pandas()
    assert len(df) == 10
    assert {"episode", "step", "reward", "t_sim", "state_7", "ee_quat_3", "action_6"} <= set(df.columns)
    assert "steer_fast_strength" in df.columns and "steer_fast_layers" not in df.columns
    assert df["step"].tolist() == [*range(6), *range(4)]
    assert df["complete"].tolist() == [True] * 6 + [False] * 4
    assert len(open_store(tmp_path).to_pandas(complete_only=True)) == 6


def test_writer_is_a_context_manager(tmp_path):
    rec = Recorder(tmp_path)
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="sim exploded"), rec.start_episode({"task": "x"}) as ep:
        ep.step(**make_step(0, rng))
        raise RuntimeError("sim exploded")
    with rec.start_episode({"task": "y"}) as ok:
        ok.step(**make_step(0, rng))
    store = open_store(tmp_path)
    bad, good = store.episodes()
    assert not bad.complete and bad.n_steps == 1
    assert good.complete and good.success is None
    events = store.load(bad.id).events
    assert events[-1]["kind"] == "abort" and "sim exploded" in events[-1]["reason"]
    with pytest.raises(RuntimeError, match="closed"):
        ep.step(**make_step(1, rng))


# --------------------------------------------------------------------------------------- clear errors


def test_schema_errors_name_the_field(tmp_path):
    rng = np.random.default_rng(0)
    ep = Recorder(tmp_path).start_episode({"task": "x"})
    first = make_step(0, rng)
    ep.step(**first)

    def bad(match: str, **change):
        with pytest.raises(SchemaError, match=match):
            ep.step(**{**make_step(1, rng), **change})

    bad(r"^state: .*\(9,\).*\(8,\)", state=np.zeros(9))
    bad(r"^action: .*float64", action=np.zeros(7))
    bad(r"^ee_quat: expected shape \(4,\)", ee_quat=np.zeros(3))
    bad(r"images\['wrist'\]: .*uint8", images={**first["images"], "wrist": np.zeros((12, 16, 3), np.float32)})
    bad(
        r"images\['front'\]: not in the episode's first step",
        images={**first["images"], "front": first["images"]["wrist"]},
    )
    bad(
        r"activations\['fast'\]: .*\(13,\)",
        activations={**first["activations"], "fast": np.zeros(13, np.float32)},
    )
    bad(r"^ee_vel: missing", ee_vel=None)
    bad(r"^state: dtype <U3 is not numeric", state=np.array(["abc"]))
    bad(r"^state: not an array", state=[[1.0, 2.0], [3.0]])
    bad(r"^reward: expected a number", reward="high")
    bad(r"^steering\.fast: object cannot be stored", steering={"fast": object()})
    assert ep.n_steps == 1  # nothing half-written by the rejected steps

    nan = make_step(1, rng)
    nan["action"][2] = np.nan
    ep.step(**nan)  # recorded as-is, flagged by an event
    ep.end(success=False)
    back = open_store(tmp_path).load(ep.id)
    assert np.isnan(back.arrays["action"][1, 2])
    assert {"kind": "nonfinite", "step": 1, "fields": ["action"]}.items() <= back.events[-1].items()


def test_missing_store_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        open_store(missing)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="plain.*not a rollout store"):
        open_store(tmp_path / "plain")
    record(tmp_path / "s", 1, seed=0)
    with pytest.raises(KeyError, match="000999-deadbeef"):
        open_store(tmp_path / "s").load("000999-deadbeef")


# ----------------------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from vla_steer.core.rollouts import Recorder
    ep = Recorder(sys.argv[1], flush_interval_s=0.2).start_episode({"task": "kill me"})
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
        time.sleep(0.5)  # let it run through a few flush intervals
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
    ep = Recorder(tmp_path, flush_interval_s=60).start_episode({})
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    rng = np.random.default_rng(0)
    for i in range(20):
        ep.step(**make_step(i, rng))
    assert calls == []
    ep.end()
    assert calls  # the end is always made durable


def test_torn_and_corrupt_logs_keep_the_intact_prefix(tmp_path):
    ep_id, steps = record(tmp_path, 8, seed=3)
    store = open_store(tmp_path)
    log = tmp_path / "episodes" / ep_id / LOG
    original = log.read_bytes()
    rng = np.random.default_rng(0)

    def check(data: bytes) -> rollouts.Episode:
        log.write_bytes(data)
        ep = store.load(ep_id)  # never raises
        assert_steps_equal(ep, steps[: ep.n_steps])
        if len(data) != len(original):  # the summary (a cache) no longer matches the log: listing rescans
            info = store.info(ep_id)
            assert info.n_steps == ep.n_steps and info.complete == ep.complete
        return ep

    for cut in sorted(rng.integers(1, len(original), 25)):  # truncated anywhere, mid-record included
        ep = check(original[:cut])
        assert not ep.complete and ep.tail_error
    assert check(original[:0]).n_steps == 0

    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0xFF  # a bit flip in the middle: stop there, keep what came before
    ep = check(bytes(flipped))
    assert 0 < ep.n_steps < 8 and "crc" in ep.tail_error

    lengths = bytearray(original)
    lengths[4:8] = b"\xff\xff\xff\x7f"  # the first record's header length: nothing readable follows
    ep = check(bytes(lengths))
    assert ep.n_steps == 0 and ep.meta == {"length": 0}

    ep = check(original + rng.integers(0, 256, 100, dtype=np.uint8).tobytes())  # trailing garbage
    assert ep.complete and ep.n_steps == 8 and ep.tail_error

    log.write_bytes(original)
    (tmp_path / "episodes" / ep_id / rollouts.SUMMARY).write_text("{not json")
    assert store.info(ep_id).n_steps == 8  # a damaged summary is only a cache


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


# -------------------------------------------------------------------------------------- LeRobot export


def test_export_lerobot_v3(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("pandas")
    av = pytest.importorskip("av")
    root = tmp_path / "store"
    _, steps0 = record(root, 6, seed=0)
    _, steps1 = record(root, 4, seed=1, instruction="open the drawer")
    record(root, 3, seed=2, end=False)  # incomplete: left out by default
    out = export_lerobot(root, tmp_path / "lerobot", fps=10, robot_type="panda")

    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "panda"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (2, 10, 2)
    assert info["splits"] == {"train": "0:2"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    feats = info["features"]
    assert feats["observation.state"] == {
        "dtype": "float32",
        "shape": [8],
        "names": [f"state_{i}" for i in range(8)],
    }
    assert feats["action"]["shape"] == [7]
    cam = feats["observation.images.agentview"]
    assert cam["dtype"] == "video" and cam["shape"] == [12, 16, 3]
    assert cam["info"]["video.codec"] == "h264" and cam["info"]["video.fps"] == 10
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert feats[name]["shape"] == [1]

    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert set(data.column_names) == {k for k, f in feats.items() if f["dtype"] != "video"}
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 8)
    d = data.to_pydict()
    np.testing.assert_array_equal(
        d["observation.state"],
        np.concatenate([[s["state"] for s in steps0], [s["state"] for s in steps1]]).astype(np.float32),
    )
    assert d["index"] == list(range(10))
    assert d["episode_index"] == [0] * 6 + [1] * 4
    assert d["frame_index"] == [*range(6), *range(4)]
    assert d["timestamp"] == pytest.approx([*(np.arange(6) / 10), *(np.arange(4) / 10)])
    assert d["next.done"] == [False] * 5 + [True] + [False] * 3 + [True]

    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [
        (e["episode_index"], e["length"], e["dataset_from_index"], e["dataset_to_index"]) for e in eps
    ] == [
        (0, 6, 0, 6),
        (1, 4, 6, 10),
    ]
    assert eps[1]["tasks"] == ["open the drawer"]
    key = "videos/observation.images.wrist"
    assert (eps[1][f"{key}/from_timestamp"], eps[1][f"{key}/to_timestamp"]) == pytest.approx((0.6, 1.0))
    assert len(eps[0]["stats/action/mean"]) == 7 and eps[0]["stats/action/count"] == [6]

    tasks = pq.read_table(out / "meta/tasks.parquet").to_pandas()
    assert tasks.index.name == "task" and tasks["task_index"].tolist() == [0, 1]
    stats = json.loads((out / "meta/stats.json").read_text())
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(stats["observation.images.agentview"]["mean"]).shape == (3, 1, 1)
    all_actions = np.array([s["action"] for s in steps0 + steps1], np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-5)

    with av.open(str(out / "videos/observation.images.agentview/chunk-000/file-000.mp4")) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert [t for t, _ in frames] == pytest.approx(np.arange(10) / 10)
    assert all(f.shape == (12, 16, 3) for _, f in frames)

    with pytest.raises(FileExistsError, match="not empty"):
        export_lerobot(root, out, fps=10)
    assert export_lerobot(root, tmp_path / "all", fps=10, include_incomplete=True).exists()
    assert json.loads((tmp_path / "all/meta/info.json").read_text())["total_frames"] == 13


def test_export_failure_leaves_nothing(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("pandas")
    pytest.importorskip("av")
    record(tmp_path / "store", 3, seed=0)
    rng = np.random.default_rng(0)
    ep = Recorder(tmp_path / "store").start_episode({"task": "other robot"})
    ep.step(**{**make_step(0, rng), "state": np.zeros(5)})
    ep.end(success=True)
    with pytest.raises(SchemaError, match=r"^state: episode .* has \(5,\)"):
        export_lerobot(tmp_path / "store", tmp_path / "out", fps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


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
    assert back.complete and back.tail_error is None
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
