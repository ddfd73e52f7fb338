"""A live speed setpoint over a real robosuite episode, every step the installed command: `vla-steer serve`,
`vla-steer knobs target speed=...`, `vla-steer sim`. The sim node sends each observation's end-effector
position and sim time; the node's controller measures the speed on them, and the rollout records what it
measured. The sim steps at 20 Hz and the policy announces 10 Hz, so a node that took the policy's step for
the time between observations would measure half the speed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import VLA_STEER, free_address, serve_process

from vla_steer.core.rollouts import open_store
from vla_steer.core.setpoints import SpeedEstimate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
TARGET = 0.05


def lift_config(directory: Path) -> Path:
    """robosuite Lift at its default 20 Hz, the camera the test checkpoint takes."""
    path = directory / "lift.yaml"
    path.write_text("kind: robosuite\ntask: Lift\nrobot: Panda\ncameras: {agentview: agentview}\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([VLA_STEER, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, f"vla-steer {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sim_node_sends_what_a_live_speed_setpoint_measures_and_the_rollout_records_it(
    checkpoint, tmp_path
):
    env_cfg = lift_config(tmp_path)
    address, runs = free_address(), tmp_path / "runs"
    serve = serve_process(checkpoint, address)
    try:
        assert (
            "setpoints: speed=0.05" in run("knobs", "target", f"speed={TARGET}", "--server", address).stdout
        )
        run("sim", "--server", address, "--env", str(env_cfg), "--episodes", "1", "--max-steps", "8",
            "--out", str(runs), "--timeout", "60")  # fmt: skip
    finally:
        serve.terminate()
        serve.communicate(timeout=30)

    steps = open_store(runs).to_pandas()
    assert len(steps) == 8 and (steps["info_speed_target"] == TARGET).all()
    # What the node should have measured, from the recorded positions and times (each row's t_sim is a
    # step after its observation's: the same differences).
    estimate = SpeedEstimate(dt=1e9)  # a node falling back on a step of its own would measure ~0
    ee = steps[["ee_pos_0", "ee_pos_1", "ee_pos_2"]].to_numpy()
    expected = [estimate.update(p, t=t) for p, t in zip(ee, steps["t_sim"], strict=True)]
    expected = np.array([np.nan if e is None else e for e in expected])
    assert np.isfinite(expected).sum() >= 3, expected  # the random policy moves the arm
    np.testing.assert_allclose(steps["info_speed_measured"].to_numpy(), expected, rtol=1e-6)
    # The controller acted on it: the fast/slow strength it applied is the one the step recorded.
    signed = steps["info_speed_strength"].to_numpy()
    applied = steps["steer_fast_strength"].where(steps["steer_fast_enabled"], 0.0) - steps[
        "steer_slow_strength"
    ].where(steps["steer_slow_enabled"], 0.0)
    np.testing.assert_allclose(applied.to_numpy(), signed)
    assert np.any(signed != 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_eval_grid_runs_a_setpoint_as_a_setting_and_the_analysis_groups_it(checkpoint, tmp_path):
    env_cfg = lift_config(tmp_path)
    address, runs = free_address(), tmp_path / "grid"
    serve = serve_process(checkpoint, address)
    try:
        bad = subprocess.run(
            [VLA_STEER, "eval", "--server", address, "--env", str(env_cfg), "--out", str(tmp_path / "x"),
             "--settings", "tilt@0.1"],
            capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
        assert bad.returncode != 0 and "the node holds no setpoint for ['tilt']" in bad.stderr, bad.stderr
        run("eval", "--server", address, "--env", str(env_cfg), "--settings", "off", f"speed@{TARGET}", "up=2",
            "--episodes", "1", "--max-steps", "6", "--out", str(runs), "--workers", "1")  # fmt: skip
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
    store = open_store(runs)
    labels = {i.meta["setting_label"]: i for i in store.episodes()}
    assert set(labels) == {"off", "speed@0.05", "up=2"}
    steps = store.to_pandas()
    held, off = (steps[steps["episode"] == labels[k].id] for k in ("speed@0.05", "off"))
    assert (held["info_speed_target"] == TARGET).all() and held["info_speed_measured"].notna().sum() >= 2
    assert off["info_speed_target"].isna().all()
    r = run("analyze", str(runs))
    assert "3 settings" in r.stdout and "speed@0.05" in (runs / "report.html").read_text()
