"""LeRobot v3.0 export of a rollout store."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from rollout_steps import make_step, record

from vla_steer.core.rollouts import Recorder, SchemaError, export_lerobot
from vla_steer.core.rollouts.format import LOG


def test_export_lerobot_v3(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("pandas")
    av = pytest.importorskip("av")
    root = tmp_path / "store"
    _, steps0 = record(root, 6, seed=0, robot="panda")
    _, steps1 = record(root, 4, seed=1, instruction="open the drawer")
    record(root, 3, seed=2, end=False)  # incomplete: left out
    out = export_lerobot(root, tmp_path / "lerobot", fps=10)

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


def test_export_refuses_a_damaged_episode_and_names_it(tmp_path, caplog):
    """Today's main exports a cut-short episode as if it were whole."""
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("pandas")
    pytest.importorskip("av")
    root = tmp_path / "store"
    ok_id, _ = record(root, 4, seed=0)
    bad_id, _ = record(root, 6, seed=1)
    log = root / "episodes" / bad_id / LOG
    data = log.read_bytes()
    log.write_bytes(data[: len(data) * 2 // 3])  # a power cut took the end of a closed episode
    with pytest.raises(ValueError, match=rf"episode {bad_id} \(damaged: .*steps lost .*skip_damaged=True"):
        export_lerobot(root, tmp_path / "out", fps=10)
    assert not (tmp_path / "out").exists()

    with caplog.at_level(logging.WARNING, logger="vla_steer.core.rollouts.export"):
        out = export_lerobot(root, tmp_path / "out", fps=10, skip_damaged=True)
    assert f"leaving out damaged episodes: episode {bad_id}" in caplog.text
    info = json.loads((out / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_frames"]) == (1, 4)
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet")
    assert eps.column("vla_steer/episode_id").to_pylist() == [ok_id]
