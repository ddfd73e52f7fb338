"""The analysis on rollout stores written by the real Recorder, with behaviour planted in the episodes.

The episodes are synthetic (a known speed and carrying height per setting, noise per seed) so the expected
changes are known; everything from the store's files to the report is the real code path.
"""

from __future__ import annotations

import io
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vla_steer.app.cli import main
from vla_steer.core.analysis import analyze, episode_metrics, mean_ci, relative_change
from vla_steer.core.analysis.report import summarise
from vla_steer.core.discovery.direction import Direction, DirectionNeuron
from vla_steer.core.rollouts import Recorder, open_store

SETTINGS = {  # setting -> (speed factor, carrying height offset m)
    (): (1.0, 0.0),
    (("fast", 8.0),): (1.4, 0.0),
    (("fast", 4.0),): (1.15, 0.0),
    (("slow", 8.0),): (0.7, 0.0),
    (("up", 8.0),): (1.0, 0.05),
    (("fast:random", 8.0),): (1.0, 0.0),  # the one-draw name of earlier runs
    (("fast:random2", 8.0),): (1.02, 0.0),
}


def write_episode(
    rec: Recorder, setting: dict, seed: int, speed: float, dz: float, n_neurons: int = 3
) -> None:
    rng = np.random.default_rng(seed)
    base = 0.1 * (1 + 0.1 * rng.standard_normal())  # per-seed speed, shared by every setting (matched seeds)
    w = rec.start_episode({"setting": setting, "setting_label": str(setting)})
    pos = np.array([0.0, 0.0, 1.0])
    n = 40
    for t in range(n):
        moving = t < 30
        v = np.array([base * speed, 0.0, 0.0]) if moving else np.zeros(3)
        pos = pos + v * 0.1
        carrying = t >= 20
        z = 0.9 + (0.1 + dz if carrying else 0.0)
        act = np.full((7, n_neurons), np.linalg.norm(v), dtype=np.float32)  # neuron 0..: tracks speed
        act[:, 1] = z
        frame = np.full((8, 8, 3), t * 6, dtype=np.uint8)  # the camera: brighter as time goes on
        plan = "fast middle" if speed > 1.1 and moving else "normal middle"  # what a planning policy says
        w.step(ee_pos=np.array([pos[0], 0.0, z]), ee_vel=v, action=np.zeros(7), reward=float(carrying),
               t_wall=float(t), activations={"fast": act}, images={"wrist": frame},
               policy_info={"plan": plan, "policy_ms": 5.0})  # fmt: skip
    w.end(success=True, seed=seed)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rec = Recorder(root / "rollouts")
    for setting, (speed, dz) in SETTINGS.items():
        for seed in range(12):
            write_episode(rec, dict(setting), seed, speed, dz)
    neurons = [DirectionNeuron(3, 7, 1.0, 2.0, ["fast", "quick"]), DirectionNeuron(5, 1, 1.0, 1.5, ["rapid"]),
               DirectionNeuron(5, 9, -1.0, 1.0, ["slow"])]  # fmt: skip
    Direction("fast", "speed", neurons).save(root / "directions")
    return root


def test_metrics_of_one_episode_are_what_was_planted(run_dir):
    store = open_store(run_dir / "rollouts")
    info = next(e for e in store.episodes() if e.meta["setting"] == {"fast": 8.0})
    m = episode_metrics(store.load(info.id))
    seed_speed = 0.1 * (1 + 0.1 * np.random.default_rng(m.seed).standard_normal())
    assert m.setting.direction == "fast" and m.setting.strength == 8.0 and not m.setting.control
    assert m.moving_speed == pytest.approx(1.4 * seed_speed)
    assert m.mean_speed == pytest.approx(1.4 * seed_speed * 30 / 40)  # idling lowers the plain mean only
    assert m.carry_height == pytest.approx(1.0) and m.length == 40 and m.success


def test_analysis_recovers_planted_changes_with_confidence_intervals(run_dir, tmp_path):
    a = analyze(run_dir, out=tmp_path)
    fast8 = a.setting("fast", 8.0).change["moving_speed"]
    assert fast8.mean == pytest.approx(0.4, abs=1e-9) and fast8.low > 0.3 and fast8.high < 0.5
    assert a.setting("slow", 8.0).change["moving_speed"].mean == pytest.approx(-0.3, abs=1e-9)
    up = a.setting("up", 8.0).change["carry_height"]
    assert up.mean == pytest.approx(0.05, abs=1e-9) and up.low > 0
    control = a.setting("fast", 8.0, control=True).change["moving_speed"]
    assert control.mean == pytest.approx(0.0, abs=1e-9) and control.low <= 0 <= control.high
    draws = a.controls("fast", 8.0)
    assert [(d.setting.draw, d.setting.label) for d in draws] == [
        (0, "fast (random)=8"),
        (2, "fast (random 2)=8"),
    ]
    assert draws[1].change["moving_speed"].mean == pytest.approx(0.02, abs=1e-9)
    assert a.controls("fast", 4.0) == [] and a.controls("slow", 8.0) == []
    success = a.setting("fast", 8.0).success  # 12 of 12: a Wilson interval, not a degenerate [1, 1]
    assert success.mean == 1.0 and success.high == 1.0 and 0.7 < success.low < 0.8 and success.n == 12
    assert a.best("fast", "moving_speed", 1.0).setting.strength == 8.0
    # What the policy said at each step, per setting: the plan words and their share of the steps.
    assert a.setting("fast", 8.0).plans == {"fast middle": 0.75, "normal middle": 0.25}
    assert a.setting("baseline").plans == {"normal middle": 1.0}

    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {(s["direction"], s["strength"], s["control"] and s["draw"] + 1): s for s in summary["settings"]}
    assert rows[("fast", 8.0, False)]["episodes"] == 12 and rows[("fast", 8.0, False)]["success_rate"] == 1.0
    assert (
        rows[("fast", 8.0, 1)]["mode"] == "clamp" and rows[("fast", 8.0, 3)]["label"] == "fast (random 2)=8"
    )
    assert rows[("fast", 8.0, False)]["success"]["ci95"][1] == 1.0
    lo, hi = rows[("baseline", 0.0, False)]["moving_speed"]["ci95"]
    assert lo < rows[("baseline", 0.0, False)]["moving_speed"]["mean"] < hi
    assert summary["directions"]["fast"]["neurons"][0]["tokens"] == ["fast", "quick"]
    assert rows[("fast", 4.0, False)]["plans"] == {"fast middle": 0.75, "normal middle": 0.25}
    # The logged "fast" activations: column 0 tracks speed, column 1 height, mapped to the direction's neurons.
    tracks = {(t["layer"], t["index"]): t for t in summary["tracking_neurons"]}
    assert tracks[(3, 7)]["r_speed"] > 0.9 and tracks[(5, 1)]["r_height"] > 0.9

    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "L3.7" in html and "fast (random)=8" in html
    # One dose-response figure per direction (effect and success vs strength, control draws beside), and the
    # side-by-side motion strip of the baseline and each direction's strongest setting.
    assert {"dose_fast", "dose_slow", "dose_up", "motion", "trajectories"} <= set(a.figures)
    assert "fast: dose-response" in html and "Side by side" in html
    assert "plans said" in html and "fast middle 75%, normal middle 25%" in html
    for key in ("dose_fast", "motion"):
        img = plt.imread(io.BytesIO(a.figures[key]), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 300 and img[..., :3].std() > 0.05  # drawn, not blank


def test_analyze_cli_and_its_errors(run_dir, tmp_path, capsys):
    assert main(["analyze", str(run_dir), "--out", str(tmp_path), "--control-hz", "10"]) == 0
    assert (tmp_path / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    Recorder(tmp_path / "empty")
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "no complete episodes" in capsys.readouterr().err


def test_bootstrap_statistics():
    e = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and 1.0 < e.low < 2.5 < e.high < 4.0 and e.n == 4
    assert math.isnan(mean_ci([]).mean) and math.isnan(mean_ci([1.0]).low)
    paired = relative_change({0: 2.0, 1: 4.0, 2: 6.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert paired.mean == pytest.approx(1.0) and paired.low == pytest.approx(1.0)  # exact doubling per seed
    unpaired = relative_change({"a": 2.0, "b": 2.2}, {"c": 1.0, "d": 1.1})
    assert unpaired.mean == pytest.approx(1.0) and unpaired.low < 1.0 < unpaired.high


def test_carrying_starts_at_the_first_close_command_when_the_gripper_convention_is_known(tmp_path):
    rec = Recorder(tmp_path)
    w = rec.start_episode({"setting": {}, "sim": {"gripper": "open_positive"}})  # +1 open, -1 close
    for t in range(10):
        gripper = 1.0 if t < 6 else -1.0
        w.step(ee_pos=np.array([0.0, 0.0, 0.8 + 0.01 * t]), ee_vel=np.zeros(3),
               action=np.array([0, 0, 0, 0, 0, 0, gripper]), reward=0.0, t_wall=float(t))  # fmt: skip
    w.end(success=False, seed=0)
    store = open_store(tmp_path)
    m = episode_metrics(store.load(store.episode_ids()[0]))
    assert m.carry_height == pytest.approx(np.mean([0.8 + 0.01 * t for t in range(6, 10)]))


def test_speed_is_linear_only_even_in_stores_written_with_angular_velocity():
    from vla_steer.core.analysis.metrics import linear_speed

    legacy = np.array(
        [[0.3, 0.4, 0.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    )  # [v (m/s), w (rad/s)]
    np.testing.assert_allclose(linear_speed(legacy), [0.5, 0.0])
    np.testing.assert_allclose(linear_speed(legacy[:, :3]), [0.5, 0.0])


def test_a_setpoint_episode_reports_its_tracking_error_and_overshoot(tmp_path):
    """A speed held at 0.10: measured from below (0.05), past it (0.13), then settling within a few percent."""
    measured = [None, 0.05, 0.08, 0.13, 0.11, 0.095, 0.102, 0.099, 0.101, 0.1]
    rec = Recorder(tmp_path / "rollouts")
    w = rec.start_episode({"setting": {"speed@": 0.1}, "setting_label": "speed@0.1"})
    for t, m in enumerate(measured):
        info = {"speed_target": 0.1, "speed_strength": 1.0} | ({} if m is None else {"speed_measured": m})
        w.step(ee_pos=np.array([0.01 * t, 0.0, 1.0]), ee_vel=np.zeros(3), action=np.zeros(7), t_wall=float(t),
               policy_info=info)  # fmt: skip
    w.end(success=True, seed=0)
    (ep,) = [
        open_store(tmp_path / "rollouts").load(i.id) for i in open_store(tmp_path / "rollouts").episodes()
    ]
    held = episode_metrics(ep, window=5).tracking["speed"]
    assert held.target == 0.1
    assert held.error == pytest.approx(np.median(np.abs(np.array(measured[5:]) - 0.1) / 0.1))
    assert held.overshoot == pytest.approx(0.3)  # 0.13, started below
    (summary,) = summarise([episode_metrics(ep, window=5)])
    assert summary.setting.label == "speed@0.1"
    assert summary.as_dict()["tracking"]["speed"]["error"]["mean"] == pytest.approx(held.error)
    assert math.isnan(
        episode_metrics(ep).tracking["speed"].error
    )  # nothing measured after the first 20 steps
