"""Rollout reader: round trips, the pandas view, missing stores, torn and corrupt logs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from rollout_steps import assert_steps_equal, record

from vla_steer.core.rollouts import Episode, EpisodeRecorder, Recorder, open_store
from vla_steer.core.rollouts.format import LOG, SUMMARY
from vla_steer.wire import Observation, Step


def test_round_trip_two_episodes(tmp_path):
    id0, steps0 = record(tmp_path, 6, seed=0)
    id1, steps1 = record(tmp_path, 4, seed=1, policy="tiny_vla", policy_fingerprint="abc")
    store = open_store(tmp_path)
    infos = store.episodes()
    assert [i.id for i in infos] == [id0, id1]
    assert [i.n_steps for i in infos] == [6, 4]
    assert all(i.complete for i in infos)
    assert infos[1].meta["success"] is True and infos[0].meta["success"] is False
    assert infos[1].meta["policy_fingerprint"] == "abc" and infos[1].meta["final_note"] == "done"
    assert infos[1].meta["length"] == 4

    for ep_id, steps in ((id0, steps0), (id1, steps1)):
        ep = store.load(ep_id)
        assert ep.complete and ep.damage == [] and ep.lost_steps == []
        assert ep.step_index.tolist() == list(range(len(steps)))
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
    assert df["info_plan"].tolist()[:3] == ["normal middle", "fast high", "normal middle"]
    assert df["step"].tolist() == [*range(6), *range(4)]
    assert df["complete"].tolist() == [True] * 6 + [False] * 4


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


def test_torn_and_corrupt_logs_keep_every_intact_record(tmp_path):
    ep_id, steps = record(tmp_path, 8, seed=3)
    store = open_store(tmp_path)
    log = tmp_path / "episodes" / ep_id / LOG
    original = log.read_bytes()
    rng = np.random.default_rng(0)

    def check(data: bytes) -> Episode:
        log.write_bytes(data)
        ep = store.load(ep_id)  # never raises
        assert_steps_equal(ep, [steps[i] for i in ep.step_index])
        info = store.info(ep_id)  # the listing reads the log too, not only the summary
        assert (info.n_steps, info.complete) == (ep.n_steps, ep.complete)
        assert info.lost_steps == tuple(ep.lost_steps)
        return ep

    for cut in sorted(rng.integers(1, len(original), 25)):  # truncated anywhere, mid-record included
        ep = check(original[:cut])
        assert not ep.complete and ep.damage and ep.lost_steps == [(ep.n_steps, 7)]
    assert check(original[:0]).n_steps == 0

    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0xFF  # a byte flip in the middle: that record is lost, no other
    ep = check(bytes(flipped))
    assert ep.n_steps == 7 and ep.complete and "crc" in ep.damage[0].reason

    lengths = bytearray(original)
    lengths[4:8] = b"\xff\xff\xff\x7f"  # the first record's header length: only the metadata is lost
    ep = check(bytes(lengths))
    assert ep.n_steps == 8 and "task" not in ep.meta and ep.damage[0].start == 0

    ep = check(original + rng.integers(1, 256, 100, dtype=np.uint8).tobytes())  # trailing garbage
    assert ep.complete and ep.n_steps == 8 and ep.damage[-1].end == len(original) + 100

    log.write_bytes(original)
    (tmp_path / "episodes" / ep_id / SUMMARY).write_text("{not json")
    assert store.info(ep_id).n_steps == 8  # a damaged summary only loses what it said the log should hold
    assert store.info(ep_id).status == "ok"


def test_a_step_records_the_scalars_its_policy_said(tmp_path):
    """What a reply said beside its actions (a planning policy's plan words, the node's latency and batch)
    is recorded with each step. Its lists and arrays are not, nor the steering (recorded on its own), nor
    values msgpack cannot hold or long texts, so no policy's extras can fail a recording or bloat it."""
    rec = EpisodeRecorder(Recorder(tmp_path), {"task": "lift"})
    obs = Observation("lift the cube", {"wrist": np.zeros((4, 4, 3), np.uint8)})
    said = {"plan": "fast high", "policy_ms": np.float32(3.5), "batch": 2, "action_tokens": [7, 9],
            "steering": {"fast": {"strength": 24.0}}, "scores": np.ones(3), "when": np.datetime64("2026-12-02"),
            "huge": 2**70, "essay": "word " * 100}  # fmt: skip
    rec.step(Step(obs, action=np.zeros(7, np.float32), policy_info=said))
    rec.step(Step(obs, action=np.zeros(7, np.float32)))  # a reply that said nothing
    rec.end(True)
    store = open_store(tmp_path)
    (episode,) = store.episodes()
    assert store.load(episode.id).policy_info == [{"plan": "fast high", "policy_ms": 3.5, "batch": 2}, None]
    if importlib.util.find_spec("pandas"):
        plans = store.to_pandas()["info_plan"]
        assert plans[0] == "fast high" and plans.isna()[1]
