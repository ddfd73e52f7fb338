"""What `vla-steer view` shows of an episode (`episode_entries`), checked against what was recorded; the
rerun side (an .rrd read back by rerun itself) is tests/app/test_view.py."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from rollout_steps import record

from vla_steer.core.rollouts import EpisodeRecorder, Recorder, open_store
from vla_steer.core.rollouts.viewer import MAX_SERIES, episode_entries
from vla_steer.wire import Observation, Step


def test_every_recorded_field_becomes_an_entity_on_the_step_timeline(tmp_path):
    episode_id, steps = record(tmp_path, 4, seed=1)
    ep = open_store(tmp_path).load(episode_id)
    entries = list(episode_entries(ep))
    per_path = Counter(e.path for e in entries)
    for path in ("camera/agentview", "camera/wrist", "ee/position", "ee/speed", "action", "state", "reward",
                 "steering/fast", "activations/fast", "activations/layer:15"):  # fmt: skip
        assert per_path[path] == 4, path
    assert per_path["ee/trajectory"] == 1 and per_path["episode"] == 1 and per_path["events"] == 1
    static = [e for e in entries if e.step is None]
    assert {e.path for e in static} == {"episode", "ee/trajectory"}
    assert json.loads(static[0].data)["instruction"] == "put the bowl away"
    np.testing.assert_array_equal(static[1].data, np.stack([s["ee_pos"] for s in steps]))

    def at(path: str) -> list:
        return [e for e in entries if e.path == path]

    for i, e in enumerate(at("camera/wrist")):
        assert e.step == i and e.t == steps[i]["t_wall"]
        np.testing.assert_array_equal(e.data, steps[i]["images"]["wrist"])
    assert [e.data[0] for e in at("ee/speed")] == [float(np.linalg.norm(s["ee_vel"][:3])) for s in steps]
    np.testing.assert_array_equal(at("action")[2].data, steps[2]["action"])
    assert [e.data[0] for e in at("steering/fast")] == [0.0, 1.0, 2.0, 3.0]  # the strength, step by step
    np.testing.assert_allclose(at("activations/fast")[1].data, steps[1]["activations"]["fast"], rtol=1e-6)
    np.testing.assert_allclose(
        at("activations/layer:15")[0].data, steps[0]["activations"]["layer:15"].mean(0)
    )
    (event,) = at("events")
    assert (
        event.step == 2
        and event.t == 123.0
        and event.data.startswith("knobs: ")
        and '"fast": 8.0' in event.data
    )


def test_steering_while_off_is_zero_and_wide_activations_are_summarised(tmp_path):
    rec = EpisodeRecorder(Recorder(tmp_path))
    on = {"fast": {"mode": "clamp", "strength": 8.0, "enabled": True}}
    off = {"fast": {"mode": "clamp", "strength": 8.0, "enabled": False}}
    wide = np.arange(2 * 100, dtype=np.float32).reshape(2, 100) - 150  # [forwards, neurons] of a layer:N
    for steering in (off, on, None):
        obs = Observation("go", {"wrist": np.zeros((4, 4, 3), np.uint8)}, np.zeros(2, np.float32))
        rec.step(Step(obs, np.zeros(7, np.float32), steering=steering, activations={"layer:3": wide}))
    rec.end(True)
    ep = open_store(tmp_path).load(rec.episode_ids[0])
    entries = list(episode_entries(ep))
    assert [e.data[0] for e in entries if e.path == "steering/fast"] == [0.0, 8.0, 0.0]
    assert sum(e.path == "events" and e.data.startswith("steering: ") for e in entries) == 3  # each change
    series = [e.data for e in entries if e.path == "activations/layer:3"]
    assert MAX_SERIES < 100 and all(len(s) == 2 for s in series)  # mean and max |a| over the neurons
    assert series[0].tolist() == [wide.mean(), np.abs(wide.mean(0)).max()]
    assert "ee/position" not in {e.path for e in entries}  # nothing invented for fields not recorded
