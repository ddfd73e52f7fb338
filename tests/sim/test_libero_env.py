"""The LIBERO sim node: its own venv (robosuite 1.4) against a real PolicyNode serving a real TinyVLA.

The main venv runs this file; the LIBERO side runs as subprocesses with the LIBERO venv's python
(`scripts/make_libero_venv.sh`, default `.venv-libero`, or $VLA_STEER_LIBERO_PYTHON). Without that venv the
LIBERO tests skip, saying how to build it; the config and conversion tests always run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support import LIBERO_PYTHON, run_libero

from policies import load_policy
from sim.base import to_osc_action
from sim.libero_env import MAX_STEPS, LiberoConfig, load_libero_config, quat2axisangle
from vla_steer.core.config import shipped
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.core.rollouts import open_store
from vla_steer.wire import Server

ROOT = Path(__file__).resolve().parents[2]
SIMS = shipped("sims")
SPATIAL_0 = "pick up the black bowl between the plate and the ramekin and place it on the plate"

needs_libero = pytest.mark.skipif(
    not LIBERO_PYTHON.exists(),
    reason=f"no LIBERO venv at {LIBERO_PYTHON}: build it with `bash scripts/make_libero_venv.sh` "
    "(or `make libero`), or point $VLA_STEER_LIBERO_PYTHON at its python",
)


# -- configs and conversions (no LIBERO needed) ----------------------------------------------------


def test_shipped_configs_validate_and_carry_the_suite_conventions():
    paths = sorted(SIMS.glob("libero_*.yaml"))
    assert {load_libero_config(p).suite for p in paths} == set(MAX_STEPS)
    for path in paths:
        cfg = load_libero_config(path)
        conv = cfg.conventions()
        assert cfg.step_limit() == MAX_STEPS[cfg.suite] == conv["max_steps"]
        assert conv["settle_steps"] == 10 and conv["rotate_images_180"] is True
        assert conv["state"] == "eef_pos_axisangle_gripper" and len(conv["state_names"]) == 8
        assert conv["gripper"] == "close_positive" and json.dumps(conv)  # plain values for the metadata
    assert MAX_STEPS == {
        "libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400,
    }  # fmt: skip


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: libero_100\ngripper: sideways\ncolour: red\n")
    with pytest.raises(ValueError) as e:
        load_libero_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "suite" in msg and "libero_spatial" in msg
    assert "gripper" in msg and "close_positive" in msg and "colour" in msg
    with pytest.raises(ValueError, match="task_id"):
        LiberoConfig(suite="libero_goal", task_id=-1)


def test_gripper_conventions_map_to_liberos():
    """LIBERO: -1 open, +1 close. Deltas are clipped to the controller's [-1, 1]."""
    a = np.array([2.0, -3.0, 0.5, 0, 0, 0, 0.0])
    assert np.allclose(to_osc_action(a, "close_positive", False)[:6], [1, -1, 0.5, 0, 0, 0])
    for g, mode, want in [
        (1.0, "close_positive", 1.0), (-1.0, "close_positive", -1.0),
        (1.0, "open_positive", -1.0), (0.3, "open_positive", -0.3),
        (1.0, "open_unit", -1.0), (0.0, "open_unit", 1.0), (0.6, "open_unit", -0.2),
    ]:  # fmt: skip
        assert to_osc_action(np.r_[np.zeros(6), g], mode, False)[6] == pytest.approx(want)
    assert to_osc_action(np.r_[np.zeros(6), 0.6], "open_unit", True)[6] == -1.0  # OpenVLA's binarized
    with pytest.raises(ValueError, match="7 finite"):
        to_osc_action(np.r_[np.zeros(6), np.nan], "close_positive", False)


def test_quat2axisangle_matches_known_rotations():
    assert np.allclose(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    half = np.sin(np.pi / 4)
    assert np.allclose(quat2axisangle(np.array([0.0, 0.0, half, half])), [0, 0, np.pi / 2])


def test_node_modules_import_without_torch():
    """The LIBERO node's whole import graph stays torch-free (it runs where torch is not installed)."""
    code = (
        "import sys, sim.libero_node, sim.libero_env, vla_steer.core.rollouts; "
        "bad = [m for m in ('torch', 'transformers', 'libero', 'robosuite', 'mujoco') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- LIBERO itself, in its venv --------------------------------------------------------------------

ENV_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sim.libero_env import LiberoEnv, LiberoConfig
    from vla_steer.wire import ServerInfo

    info = ServerInfo("p", 7, 1, 20.0, {"agentview": (32, 32, 3)}, info={"state_dim": 8})
    out = {}
    with LiberoEnv(LiberoConfig(suite="libero_spatial", rotate_images_180=False), info) as up:
        a = up.reset(seed=3)
        out["init_state_index"] = up.init_state_index
        out["upright"] = a.images["agentview"].tolist()
        b = up.reset(seed=3)
        c = up.reset(seed=4)
        out["same_seed_same_start"] = bool(np.array_equal(a.state, b.state) and np.array_equal(
            a.images["agentview"], b.images["agentview"]))
        out["seeds_differ"] = not np.allclose(a.state, c.state)
        out["t_sim_after_settle"] = a.t_sim
        out["state"] = a.state.tolist()
        out["ee_pos"] = a.ee_pos.tolist()
        out["ee_quat"] = a.ee_quat.tolist()
        out["instruction"] = up.instruction
        out["n_init_states"] = len(up.init_states)
        out["success_at_start"] = up.success()
        z0 = a.ee_pos[2]
        for _ in range(8):
            r = up.step(np.array([0, 0, 1.0, 0, 0, 0, -1.0]))
        out["dz_up"] = float(r.observation.ee_pos[2] - c.ee_pos[2])
        out["camera"] = up.cameras
    with LiberoEnv(LiberoConfig(suite="libero_spatial"), info) as rot:
        out["rotated"] = rot.reset(seed=3).images["agentview"].tolist()
    try:
        LiberoEnv(LiberoConfig(suite="libero_spatial", task_id=10), info)
    except ValueError as e:
        out["bad_task"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)


@needs_libero
@pytest.mark.slow
def test_libero_env_seeds_settles_and_orients_images():
    r = run_libero(["-c", ENV_CHECK])
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["instruction"] == SPATIAL_0 and out["n_init_states"] == 50 and out["init_state_index"] == 3
    assert out["same_seed_same_start"] and out["seeds_differ"] and not out["success_at_start"]
    assert out["t_sim_after_settle"] == pytest.approx(10 * 0.05)  # 10 settle steps at 20 Hz
    state = np.array(out["state"])
    assert state.shape == (8,) and np.allclose(state[:3], out["ee_pos"], atol=1e-6)
    assert np.allclose(state[3:6], quat2axisangle(np.array(out["ee_quat"])), atol=1e-5)
    assert 0.0 < state[6] < 0.05 and -0.05 < state[7] < 0.0  # Panda fingers, open after settling
    assert out["dz_up"] > 0.05  # +z deltas lift the end effector
    up, rot = np.array(out["upright"], np.uint8), np.array(out["rotated"], np.uint8)
    # LIBERO's convention: the OpenGL frame rotated 180 degrees = upright mirrored left to right.
    assert np.array_equal(rot, up[:, ::-1]) and not np.array_equal(rot, up)
    assert "task_id 10 is out of range: libero_spatial has 10 tasks" in out["bad_task"]


@pytest.fixture(scope="module")
def served(checkpoint):
    node = PolicyNode(
        load_policy(checkpoint / "policy.yaml"), load_directions(checkpoint / "directions").values()
    )
    with Server(node, "tcp://127.0.0.1:0").start() as server:
        yield server, node


@needs_libero
def test_libero_node_records_an_episode_against_the_policy_node(served, tmp_path):
    """`python -m sim.libero_node` in the LIBERO venv: 10 steps of libero_spatial task 0, steered, recorded."""
    server, _ = served
    out = tmp_path / "run"
    args = [
        "-m", "sim.libero_node", "--env", str(SIMS / "libero_spatial.yaml"), "--server", server.address,
        "--episodes", "1", "--max-steps", "10", "--out", str(out), "--steer", "fast=4", "--activations", "fast",
        "--seed", "2",
    ]  # fmt: skip
    r = run_libero(args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "success rate 0% over 1 episodes" in r.stdout
    (info,) = open_store(out).episodes()
    assert info.complete and info.n_steps == 10
    ep = open_store(out).load(info.id)
    img = ep.images["agentview"]
    assert img.shape == (10, 32, 32, 3) and img.dtype == np.uint8 and img.std() > 5
    state = ep.arrays["state"]
    assert state.shape == (10, 8) and state.dtype == np.float32
    assert np.allclose(state[:, :3], ep.arrays["ee_pos"], atol=1e-6)
    assert np.allclose(state[:, 3:6], [quat2axisangle(q) for q in ep.arrays["ee_quat"]], atol=1e-5)
    assert ep.arrays["action"].shape == (10, 7) and ep.arrays["action_chunk"].shape == (10, 1, 7)
    assert np.all(np.diff(ep.arrays["t_sim"]) > 0) and ep.arrays["t_sim"][0] == pytest.approx(0.55)
    assert ep.steering[0]["fast"]["strength"] == 4.0 and ep.steering[0]["fast"]["enabled"]
    assert ep.activations["fast"].shape[0] == 10
    meta = ep.meta
    assert meta["sim"] == "libero" and meta["suite"] == "libero_spatial" and meta["task_id"] == 0
    assert meta["instruction"] == SPATIAL_0 and meta["policy"] == "tiny-vla" and meta["max_steps"] == 10
    conv = meta["conventions"]
    assert conv["settle_steps"] == 10 and conv["rotate_images_180"] is True and conv["max_steps"] == 10
    assert conv["gripper"] == "close_positive" and conv["state"] == "eef_pos_axisangle_gripper"
    assert conv["cameras"]["agentview"] == "agentview"
    assert meta["versions"]["robosuite"] == "1.4.0"
    assert [e["kind"] for e in ep.events][:1] == ["steering"]


@needs_libero
def test_libero_node_without_a_policy_node_exits_3(tmp_path):
    args = [
        "-m", "sim.libero_node", "--env", "libero_goal", "--server", "tcp://127.0.0.1:9",  # a shipped name
        "--connect-timeout", "0.5", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    r = run_libero(args, timeout=60)
    assert r.returncode == 3 and "no policy node answered" in r.stderr
