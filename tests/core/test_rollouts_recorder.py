"""The one episode recorder (sim runner and robot node): Steps into a real store, steering changes and other
events, end and abort, events between episodes, and one thread stepping while another ends episodes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vla_steer.core.rollouts import EpisodeRecorder, Event, Recorder, SchemaError, open_store
from vla_steer.wire.messages import Observation, Step

FAST = {"fast": {"mode": "clamp", "strength": 4.0, "enabled": True}}
SLOW = {"slow": {"mode": "clamp", "strength": 2.0, "enabled": True}}


def make_step(i: int, steering: dict | None = None, *, state: bool = True) -> Step:
    return Step(
        Observation(
            "pick up the cube",
            {"agentview": np.full((8, 8, 3), i % 256, np.uint8)},
            np.full(4, i, np.float32) if state else None,
        ),
        action=np.full(7, i, np.float32),
        action_chunk=np.full((2, 7), i, np.float32),
        ee_pos=np.array([i, 0.0, 1.0]),
        ee_quat=np.array([0.0, 0.0, 0.0, 1.0]),
        ee_vel=np.zeros(3),
        reward=float(i),
        t_wall=1000.0 + i,
        t_sim=0.05 * i,
        steering=steering,
        activations={"fast": np.full(3, i, np.float64)},
    )


def test_steps_and_steering_changes_make_an_episode(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path), {"task": "Lift", "sim": "robosuite"})
    assert rec.episode_id is None
    steering = [FAST, FAST, SLOW, SLOW, None]
    for i, s in enumerate(steering):
        assert rec.step(make_step(i, s), episode="episode-0003") == i
    rec.event("knobs", t=5.0, op="set", strengths={"slow": 2.0})
    opened = rec.episode_id
    info = rec.end(True, seed=3)
    assert rec.episode_id is None and rec.end() is None  # nothing open: nothing to end

    assert info.id == opened and rec.episode_ids == [opened] and info.complete
    ep = open_store(tmp_path).load(opened)
    assert ep.complete and ep.n_steps == 5
    assert ep.meta == {
        "task": "Lift",
        "sim": "robosuite",
        "instruction": "pick up the cube",
        "episode": "episode-0003",
        "seed": 3,
        "success": True,
        "length": 5,
        "conventions": {"ee_quat": "xyzw", "ee_vel": "linear m/s, world (robot base) frame", "ee_pos": "m"},
    }
    np.testing.assert_array_equal(ep.arrays["action"][:, 0], np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(ep.arrays["t_wall"], 1000.0 + np.arange(5))
    assert ep.images["agentview"].shape == (5, 8, 8, 3) and ep.arrays["action_chunk"].shape == (5, 2, 7)
    assert ep.activations["fast"].dtype == np.float32  # activations are stored as float32
    assert ep.steering == steering
    # A steering event wherever the state differs from the previous step's, the first step included.
    changes = [(e["step"], e["state"]) for e in ep.events if e["kind"] == "steering"]
    assert changes == [(0, FAST), (2, SLOW), (4, None)]
    assert {"kind": "knobs", "t": 5.0, "step": 5, "op": "set"}.items() <= ep.events[-1].items()


def test_each_episode_logs_its_first_steering_state_again(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path))
    for _ in range(2):
        rec.step(make_step(0, FAST))
        rec.step(make_step(1, FAST))
        rec.end()
    store = open_store(tmp_path)
    assert [e.id for e in store.episodes()] == rec.episode_ids and len(rec.episode_ids) == 2
    for episode_id in rec.episode_ids:
        assert [(e["kind"], e["step"]) for e in store.load(episode_id).events] == [("steering", 0)]


def test_no_steering_reported_logs_no_steering_event(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path))
    rec.step(make_step(0, None, state=False))
    rec.end()
    ep = open_store(tmp_path).load(rec.episode_ids[0])
    assert ep.events == [] and ep.steering == [None] and "state" not in ep.arrays


def test_abort_leaves_the_episode_incomplete_with_its_reason(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path))
    rec.abort("nothing open")  # a no-op
    for i in range(3):
        rec.step(make_step(i, FAST))
    rec.abort("node died", event=Event("error", {"message": "node died"}))
    assert rec.episode_id is None
    (info,) = open_store(tmp_path).episodes()
    assert not info.complete and info.n_steps == 3
    events = open_store(tmp_path).load(info.id).events
    assert [(e["kind"], e["step"]) for e in events] == [("steering", 0), ("error", 3), ("abort", 3)]
    assert events[1]["message"] == "node died" and events[2]["reason"] == "node died"


def test_events_between_episodes_open_the_next_one(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path))
    rec.step(make_step(0, FAST))
    rec.end(event=Event("stop", {"reason": "operator", "mode": "stopped"}), stop_reason="operator")
    rec.event("knobs", t=42.0, op="set", strengths={"fast": 8.0})  # while stopped: kept
    before = time.time()
    rec.event("note", text="no time given")
    after = time.time()
    with pytest.raises(SchemaError, match="object cannot be stored"):
        rec.event("bad", value=object())  # refused now, not when the next episode opens
    assert len(open_store(tmp_path).episodes()) == 1  # no episode opened for them

    rec.step(make_step(1, SLOW))
    rec.end()
    first, second = (open_store(tmp_path).load(i) for i in rec.episode_ids)
    assert first.meta["stop_reason"] == "operator"
    assert [(e["kind"], e.get("reason")) for e in first.events][-1] == ("stop", "operator")
    kinds = [(e["kind"], e["step"]) for e in second.events]
    assert kinds == [("knobs", 0), ("note", 0), ("steering", 0)]  # as they happened, then the step's state
    assert second.events[0]["t"] == 42.0 and second.events[0]["strengths"] == {"fast": 8.0}
    assert before <= second.events[1]["t"] <= after  # stamped when it arrived, not when written


def test_ending_from_another_thread_while_stepping(tmp_path):
    """The robot's inference thread steps while its watcher ends episodes: no step is lost or refused."""
    rec = EpisodeRecorder(Recorder(tmp_path))
    n, errors = 300, []
    done = threading.Event()

    def stepper():
        try:
            for i in range(n):
                rec.step(make_step(i, FAST if i % 7 else SLOW))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=stepper)
    thread.start()
    try:
        while not done.is_set():
            rec.end(event=Event("stop", {"reason": "watcher"}))
    finally:
        thread.join(30)
    rec.end()
    assert errors == []
    infos = open_store(tmp_path).episodes()
    assert [i.id for i in infos] == rec.episode_ids
    assert all(i.complete for i in infos) and sum(i.n_steps for i in infos) == n


def test_the_layout_joins_the_writers_own_conventions(tmp_path):
    from vla_steer.core.rollouts.format import CONVENTIONS

    rec = EpisodeRecorder(Recorder(tmp_path), {"conventions": {"gripper": "open_positive"}})
    rec.step(make_step(0, None))
    info = rec.end(True)
    assert open_store(tmp_path).load(info.id).meta["conventions"] == {
        "gripper": "open_positive",
        **CONVENTIONS,
    }
