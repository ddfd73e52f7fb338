"""The robosuite sim node end to end: real MuJoCo physics, a real PolicyNode serving a real TinyVLA over ZeroMQ."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from checkpoints import write_checkpoint
from pydantic import ValidationError
from support import ROOT, VLA_STEER, free_address, serve_process, serving, wait_for

from policies import load_policy
from sim.base import StepResult
from sim.robosuite_env import RobosuiteConfig, load_sim_config, quat2axisangle
from sim.runner import BadActionError, PolicyNodeDied, run_episodes
from vla_steer.core.config import shipped
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.core.rollouts import EpisodeRecorder, Recorder, open_store
from vla_steer.wire import Client, InferResult, Server

os.environ.setdefault("MUJOCO_GL", "egl")
SIMS = shipped("sims")


@pytest.fixture(scope="module")
def robosuite():
    return pytest.importorskip("robosuite")


@pytest.fixture(scope="module")
def node(checkpoint):
    return PolicyNode(
        load_policy(checkpoint / "policy.yaml"), load_directions(checkpoint / "directions").values()
    )


@pytest.fixture(scope="module")
def served(node):
    with Server(node, "tcp://127.0.0.1:0").start() as server:
        yield server


@pytest.fixture(scope="module")
def lift(robosuite, served):
    """The Lift env built for the served policy's hello reply (module-wide: building one takes seconds)."""
    from sim.robosuite_env import RobosuiteEnv

    with Client(served.address) as c:
        info = c.hello()
    env = RobosuiteEnv(load_sim_config(SIMS / "robosuite_lift.yaml"), info)
    yield env
    env.close()


class CountingEnv:
    """The real env, counting what reaches `step` (to prove bad actions never do)."""

    def __init__(self, env):
        self.env, self.steps = env, 0
        self.instruction, self.action_dim = env.instruction, env.action_dim

    def reset(self, seed=None):
        return self.env.reset(seed)

    def step(self, action) -> StepResult:
        self.steps += 1
        return self.env.step(action)

    def success(self) -> bool:
        return self.env.success()

    def close(self) -> None:
        pass


# -- configs ---------------------------------------------------------------------------------------


def test_shipped_configs_validate():
    for path in sorted(SIMS.glob("robosuite_*.yaml")):
        cfg = load_sim_config(path)
        assert cfg.kind == "robosuite" and cfg.instruction_text()


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: Lift\ngripper: sideways\ncolour: red\n")
    with pytest.raises(ValueError) as e:
        load_sim_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "gripper" in msg and "open_positive" in msg and "colour" in msg
    with pytest.raises(ValueError, match="no default instruction for task 'Wipe'"):
        RobosuiteConfig(task="Wipe").instruction_text()


def test_quat2axisangle_matches_known_rotations():
    assert np.allclose(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    half = np.sin(np.pi / 4)
    assert np.allclose(quat2axisangle(np.array([0.0, 0.0, half, half])), [0, 0, np.pi / 2])


# -- the env alone ---------------------------------------------------------------------------------


def test_env_rejects_a_policy_it_cannot_serve(robosuite):
    from sim.robosuite_env import RobosuiteEnv
    from vla_steer.wire import ServerInfo

    two_cams = ServerInfo("p", 7, 1, 10.0, {"agentview": (32, 32, 3), "wrist": (32, 32, 3)})
    with pytest.raises(ValueError, match=r"no camera for \['wrist'\]"):
        RobosuiteEnv(RobosuiteConfig(), two_cams)
    with pytest.raises(ValueError, match="state of 5 floats"):
        RobosuiteEnv(
            RobosuiteConfig(), ServerInfo("p", 7, 1, 10.0, {"a": (32, 32, 3)}, info={"state_dim": 5})
        )


def test_cli_sim_refuses_a_policy_whose_gripper_the_config_maps_otherwise(robosuite, tmp_path):
    """`vla-steer serve` a tiny OpenVLA (its gripper in [0, 1], 1 = open: `open_unit` in its hello) and
    `vla-steer sim` under robosuite's default `open_positive`: exit 2 naming the setting, nothing recorded.
    (With `gripper: open_unit` the same checkpoint runs: tests/app/test_journey.py, layout openvla.)"""
    ckpt = write_checkpoint("openvla", tmp_path)
    out = tmp_path / "run"
    with serving(ckpt, "--option", "unnorm_key=tiny_suite") as address:
        r = subprocess.run(
            [VLA_STEER, "sim", "--env", "robosuite_lift", "--server", address, "--out", str(out)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the policy's gripper is 'open_unit' but the sim config maps `gripper: open_positive`" in r.stderr
    assert "set `gripper: open_unit` in the sim config" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not list(open_store(out).episodes())


def _project(sim, camera: str, point: np.ndarray, h: int, w: int) -> tuple[float, float]:
    """Pinhole projection with MuJoCo's camera (looks along -z, y up) to (row, col), row 0 at the top."""
    cam = sim.model.camera_name2id(camera)
    d = sim.data.cam_xmat[cam].reshape(3, 3).T @ (point - sim.data.cam_xpos[cam])
    f = (h / 2) / np.tan(np.radians(sim.model.cam_fovy[cam]) / 2)
    return h / 2 - f * d[1] / -d[2] - 0.5, w / 2 + f * d[0] / -d[2] - 0.5


def test_images_are_right_side_up(robosuite):
    """The red cube shows where the camera model projects it (OpenCV rows), not at the mirrored row."""
    from sim.robosuite_env import RobosuiteEnv

    h = w = 64
    with RobosuiteEnv(RobosuiteConfig(image_size=(h, w))) as env:
        env.reset(seed=0)
        # Move the cube off the image centre (towards the camera and sideways), so a flip would show.
        sim, joint = env.env.sim, env.env.cube.joints[0]
        qpos = sim.data.get_joint_qpos(joint).copy()
        qpos[:2] = [0.2, 0.15]
        sim.data.set_joint_qpos(joint, qpos)
        sim.forward()
        obs = env.step(np.zeros(7)).observation
        img = obs.images["agentview"].astype(int)
        assert img.shape == (h, w, 3) and obs.images["agentview"].dtype == np.uint8
        row, col = _project(sim, "agentview", sim.data.body_xpos[env.env.cube_body_id], h, w)
    red = (img[..., 0] > img[..., 1] + 60) & (img[..., 0] > img[..., 2] + 60)
    assert red.sum() >= 3, "the cube is not visible"
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - row) <= 3 and abs(cols.mean() - col) <= 3
    assert abs((h - 1 - rows.mean()) - row) > 6  # an upside-down image would put it here
    # agentview looks over the white table towards the robot: table at the bottom, robot base at the top
    assert img[-h // 4 :].mean() > img[: h // 4].mean() + 30


def test_actions_move_the_end_effector_as_commanded(lift):
    lift.reset(seed=0)
    for axis in range(3):
        before = lift.observation().ee_pos
        for _ in range(6):
            a = np.zeros(7)
            a[axis] = 1.0  # a 5 cm goal offset per step in the robot base frame (aligned with the world)
            res = lift.step(a)
        moved = res.observation.ee_pos - before
        assert moved[axis] > 0.03 and abs(moved[axis]) > 3 * np.abs(np.delete(moved, axis)).max()
    for _ in range(8):
        lift.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))  # open_positive: -1 closes
    closed = lift.gripper_qpos[0]
    for _ in range(8):
        lift.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    assert lift.gripper_qpos[0] > closed + 0.01


def test_seeds_reproduce_and_differ(lift):
    a, b, c = lift.reset(seed=7), lift.reset(seed=7), lift.reset(seed=8)
    assert np.array_equal(a.images["agentview"], b.images["agentview"]) and np.allclose(a.ee_pos, b.ee_pos)
    assert not np.array_equal(a.images["agentview"], c.images["agentview"])


SCENE = """
import hashlib, json, sys
import numpy as np
from sim.robosuite_env import RobosuiteEnv, load_sim_config
from vla_steer.wire import ServerInfo

config = load_sim_config(sys.argv[1]).model_copy(update={"scene_seed": int(sys.argv[2])})
with RobosuiteEnv(config, ServerInfo("t", 7, 1, 20.0, {"agentview": (32, 32, 3)})) as env:
    obs = env.reset(seed=7)
    print(json.dumps({"cube": np.asarray(env.ground_truth["cube_pos"]).tolist(),
                      "image": hashlib.sha256(obs.images["agentview"].tobytes()).hexdigest()}))
"""


def test_every_build_of_a_config_is_the_same_scene(robosuite):
    """robosuite draws Lift's cube size when it builds the model; the scene seed makes every process (another
    worker, another run) build the same scene, so an episode seed means the same episode everywhere."""

    def build(scene_seed: int) -> dict:
        r = subprocess.run(
            [sys.executable, "-c", SCENE, str(SIMS / "robosuite_lift.yaml"), str(scene_seed)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.splitlines()[-1])

    first, second, other = build(0), build(0), build(1)
    assert first == second
    assert other["cube"][2] != first["cube"][2]  # another cube size


PLACEMENT = """
import json, sys
import numpy as np
from sim.robosuite_env import RobosuiteEnv, load_sim_config
from vla_steer.wire import ServerInfo

r = None if sys.argv[2] == "none" else float(sys.argv[2])
config = load_sim_config(sys.argv[1]).model_copy(update={"placement_range": r})
with RobosuiteEnv(config, ServerInfo("t", 7, 1, 20.0, {"agentview": (16, 16, 3)})) as env:
    cubes = []
    for seed in range(24):
        env.reset(seed=seed)
        cubes.append(np.asarray(env.ground_truth["cube_pos"])[:2].tolist())
try:
    RobosuiteEnv(config.model_copy(update={"unseen_bodies": ["robot0_", "no_such_body"]}))
except ValueError as e:
    refused = str(e)
print(json.dumps({"cubes": cubes, "refused": refused}))
"""


@pytest.mark.slow
def test_placement_range_widens_where_the_cube_is_placed(robosuite):
    """placement_range 0.07 places the cube over +-7 cm, where Lift places it over +-3 cm. (And an
    `unseen_bodies` prefix that names no body is refused, naming it.)"""

    def build(r: str) -> dict:
        p = subprocess.run(
            [sys.executable, "-c", PLACEMENT, str(SIMS / "robosuite_lift.yaml"), r],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.splitlines()[-1])

    default = build("none")
    usual, wide = np.abs(np.array(default["cubes"])), np.abs(np.array(build("0.07")["cubes"]))
    assert "'no_such_body'" in default["refused"]
    assert usual.max() <= 0.03 + 1e-9
    assert 0.045 < wide.max() <= 0.07 + 1e-9
    with pytest.raises(ValidationError, match="placement_range"):
        RobosuiteConfig(placement_range=0.0)


# -- the runner against a served policy -----------------------------------------------------------


def test_lift_episodes_end_to_end_with_steering_and_activations(lift, served, node, tmp_path):
    records = []
    recorder = EpisodeRecorder(Recorder(tmp_path), {"task": "Lift"})
    with Client(served.address) as client:
        summaries = run_episodes(
            client, lift, n_episodes=2, max_steps=15, recorder=recorder, on_step=records.append,
            steer={"fast": 4.0}, activations=["fast"], seed=3,
        )  # fmt: skip
        client.knobs_off()
    # Named by seed: matched episodes of different settings (or workers) share the number.
    assert [s.episode for s in summaries] == ["episode-0003", "episode-0004"]
    assert all(s.error is None and s.length == 15 and s.inferences == 15 for s in summaries)
    assert len(records) == 30
    store = open_store(tmp_path)
    assert [e.id for e in store.episodes()] == recorder.episode_ids
    for info, summary in zip(store.episodes(), summaries, strict=True):
        assert info.complete and info.n_steps == 15
        assert info.meta["episode"] == summary.episode and info.meta["seed"] == summary.seed
        assert info.meta["task"] == "Lift" and info.meta["instruction"] == "pick up the red cube"
        assert info.meta["success"] is False
    n_fast = len(node.steerer.neurons("fast"))
    for r in records:
        img = r.step.observation.images["agentview"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img[-8:].mean() > img[:8].mean() + 30  # right side up: the white table fills the bottom
        assert r.step.action_chunk.shape == (1, 7) and np.array_equal(r.step.action, r.step.action_chunk[0])
        assert r.step.steering["fast"]["strength"] == 4.0 and r.step.steering["fast"]["enabled"]
        assert r.step.activations["fast"].shape == (7, n_fast)
        assert r.step.observation.state is None  # the TinyVLA takes no state
        assert r.step.ee_pos.shape == (3,) and r.step.ee_quat.shape == (4,) and r.step.ee_vel.shape == (3,)
        assert r.step.observation.instruction == "pick up the red cube"
    first = [r for r in records if r.episode == "episode-0003"]
    assert [r.index for r in first] == list(range(15))
    assert np.all(np.diff([r.step.t_sim for r in first]) > 0) and np.all(
        np.diff([r.step.t_wall for r in first]) >= 0
    )
    # The (random) policy's actions move the arm.
    assert np.linalg.norm(first[-1].step.ee_pos - first[0].step.ee_pos) > 0.01
    s = summaries[0]
    assert s.mean_ee_displacement > 0.001 and s.mean_ee_speed > 0.01 and 0.8 < s.mean_ee_height < 1.5
    assert not s.success


def _custom_server(node, infer, state_dim=None):
    """The real node behind hand-written infer/hello handlers (to send what a healthy node never would)."""

    def hello(req):
        info = node.hello(req)
        return dataclasses.replace(info, info={**info.info, "state_dim": state_dim}) if state_dim else info

    return Server({"hello": hello, "reset": node.reset, "infer": infer}, "tcp://127.0.0.1:0").start()


def test_state_is_sent_and_chunks_replan_after_execute_steps(robosuite, node):
    from sim.robosuite_env import RobosuiteEnv

    states = []

    def infer(req):  # a chunk of 4 from the real policy; the state arrives as the policy family expects
        states.append(np.array(req.payload["observation"]["state"]))
        reply = node.infer(req)
        a = reply.payload.actions
        return InferResult(np.concatenate([a, a * 0.5, -a, a * 0]).astype(np.float32), {}, reply.payload.info)

    records = []
    with _custom_server(node, infer, state_dim=8) as server, Client(server.address) as client:
        env = RobosuiteEnv(load_sim_config(SIMS / "robosuite_lift.yaml"), client.hello())
        try:
            (s,) = run_episodes(client, env, 1, max_steps=7, execute_steps=3, on_step=records.append)
        finally:
            env.close()
    assert s.length == 7 and s.inferences == 3 == len(states)
    assert [r.chunk_index for r in records] == [0, 1, 2, 0, 1, 2, 0]
    assert all(st.shape == (8,) and st.dtype == np.float32 for st in states)
    assert np.allclose(records[0].step.observation.state, states[0]) and np.allclose(
        states[0][:3], records[0].step.ee_pos
    )
    assert np.allclose(
        records[0].step.observation.state[3:6], quat2axisangle(records[0].step.ee_quat), atol=1e-5
    )


@pytest.mark.parametrize("client_checks", [True, False])
def test_non_finite_actions_never_reach_the_env(lift, node, client_checks):
    def infer(req):
        return InferResult(np.array([[0.1, 0.0, np.nan, 0, 0, 0, 1]], np.float32))

    env = CountingEnv(lift)
    with (
        _custom_server(node, infer) as server,
        Client(server.address, require_finite_actions=client_checks) as c,
        pytest.raises(BadActionError, match="non-finite") as e,
    ):
        run_episodes(c, env, 1, max_steps=5)
    assert env.steps == 0
    assert e.value.episode == "episode-0000" and e.value.summaries[-1].error


def test_wrong_action_shape_is_refused(lift, node):
    env = CountingEnv(lift)
    infer = lambda req: InferResult(np.zeros((1, 6), np.float32))  # noqa: E731
    with (
        _custom_server(node, infer) as server,
        Client(server.address) as c,
        pytest.raises(BadActionError, match=r"shape \[1, 6\]; expected \[chunk, 7\]"),
    ):
        run_episodes(c, env, 1, max_steps=5)
    assert env.steps == 0


def test_node_dying_during_an_inference_ends_the_episode_from_heartbeats(lift, node, tmp_path):
    """The node goes away while an inference is in flight: the runner notices from heartbeats, not timeouts.

    (How fast it notices is benchmarked, not tested: "stopped answering" is the heartbeat watch's verdict;
    the client's 4 s request timeout would say "did not answer".)"""
    calls = 0
    gone = threading.Event()

    def infer(req):
        nonlocal calls
        calls += 1
        if calls == 4:  # stuck while the server is closed underneath it
            threading.Thread(target=server.close, daemon=True).start()
            gone.wait(10)
        return node.infer(req)

    server = _custom_server(node, infer)
    records = []
    recorder = EpisodeRecorder(Recorder(tmp_path))
    # Closing the client waits for the abandoned request to time out (Client.close takes the request
    # lock), hence not a longer timeout.
    try:
        with Client(server.address, timeout=4.0, retries=0) as c:
            with pytest.raises(PolicyNodeDied, match="stopped answering during infer") as e:
                run_episodes(c, lift, 1, max_steps=50, recorder=recorder, on_step=records.append)
            gone.set()
    finally:
        gone.set()
        server.close()
    assert e.value.step == 3 and len(records) == 3 and e.value.summaries[0].length == 3
    # What was recorded is kept, incomplete, with why it stopped.
    (info,) = open_store(tmp_path).episodes()
    assert not info.complete and info.n_steps == 3
    events = open_store(tmp_path).load(info.id, images=False).events
    assert [ev["kind"] for ev in events][-2:] == ["error", "abort"]
    assert "stopped answering" in events[-2]["message"] and events[-1]["reason"] == events[-2]["message"]


def test_sigkilled_node_process_ends_the_episode_from_heartbeats(lift, checkpoint):
    address = free_address()
    proc = serve_process(checkpoint, address, directions=False)
    try:

        def on_step(r):
            if r.index == 4:
                proc.send_signal(signal.SIGKILL)

        # A blind wait (the 4 s timeout) would say "did not answer".
        with (
            Client(address, timeout=4.0, retries=0) as c,
            pytest.raises(PolicyNodeDied, match="stopped answering"),
        ):
            run_episodes(c, lift, 1, max_steps=50, on_step=on_step)
    finally:
        proc.kill()
        proc.wait(10)


def test_cli_sim_whose_node_dies_exits_4_and_summarises_what_ran(robosuite, checkpoint, tmp_path):
    """`vla-steer sim` loses its policy node mid-run: exit code 4, the episodes so far summarised and kept."""
    address, out = free_address(), tmp_path / "run"
    proc = serve_process(checkpoint, address, directions=False)
    cmd = [
        VLA_STEER,
        "sim",
        "--env",
        "robosuite_lift",
        "--server",
        address,
        "--episodes",
        "50",
        "--out",
        str(out),
    ]
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(out.glob("*/*")), timeout=120, what="the first episode in the store")
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = sim.communicate(timeout=120)
    finally:
        for p in (sim, proc):
            p.kill()
            p.wait(10)
    assert sim.returncode == 4, stderr
    assert "stopped answering" in stderr and "success rate 0% over" in stdout
    (first, *_) = open_store(out).episodes()
    assert first.n_steps >= 1


@pytest.mark.slow
@pytest.mark.parametrize("config", ["robosuite_stack", "robosuite_pickplace_can", "robosuite_lift_ur5e"])
def test_other_tasks_and_robots_run_with_the_policy(robosuite, served, config):
    from sim.robosuite_env import RobosuiteEnv

    records = []
    with Client(served.address) as client:
        env = RobosuiteEnv(load_sim_config(SIMS / f"{config}.yaml"), client.hello())
        try:
            (s,) = run_episodes(client, env, 1, max_steps=10, on_step=records.append)
        finally:
            env.close()
    assert s.length == 10 and s.error is None
    assert records[0].step.observation.images["agentview"].shape == (32, 32, 3)
    assert np.linalg.norm(records[-1].step.ee_pos - records[0].step.ee_pos) > 0.005


def test_cli_sim_records_episodes_into_a_rollout_store(robosuite, served, tmp_path):
    """`vla-steer sim` against a live node: every executed step lands in the store, knobs included."""
    out = tmp_path / "run"
    cmd = [
        VLA_STEER, "sim", "--env", str(SIMS / "robosuite_lift.yaml"),
        "--server", served.address, "--episodes", "2", "--max-steps", "4", "--out", str(out),
        "--steer", "fast=4", "--activations", "fast",
    ]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MUJOCO_GL": "egl"}
    )
    assert r.returncode == 0, r.stderr
    assert "success rate" in r.stdout
    store = open_store(out)
    episodes = store.episodes()
    assert len(episodes) == 2 and all(e.complete and e.n_steps == 4 for e in episodes)
    ep = store.load(episodes[0].id)
    assert ep.images["agentview"].shape == (4, 32, 32, 3) and ep.arrays["ee_pos"].shape == (4, 3)
    assert ep.steering[0]["fast"]["strength"] == 4.0 and ep.steering[0]["fast"]["enabled"]
    assert ep.activations["fast"].shape[0] == 4
    assert ep.meta["task"] == "Lift" and ep.meta["conventions"]["gripper"] == "open_positive"
    assert ep.meta["sim"] == "robosuite" and ep.meta["max_steps"] == 4 and "mujoco" in ep.meta["versions"]
    assert [e["kind"] for e in ep.events][:1] == ["steering"]
    # A second run appends to the same store.
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    assert len(open_store(out).episodes()) == 4


def test_cli_eval_grid_with_matched_seeds_and_videos(robosuite, served, tmp_path):
    out = tmp_path / "grid"
    cmd = [
        VLA_STEER, "eval", "--env", str(SIMS / "robosuite_lift.yaml"),
        "--server", served.address, "--settings", "off", "fast=60,up=60", "--episodes", "2",
        "--max-steps", "3", "--out", str(out), "--video", "agentview",
    ]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MUJOCO_GL": "egl"}
    )
    assert r.returncode == 0, r.stderr
    assert "fast=60,up=60" in r.stdout and "off" in r.stdout
    rows = json.loads((out / "eval.json").read_text())
    assert [row["setting"] for row in rows] == ["off", "fast=60,up=60"] and all(
        row["episodes"] == 2 for row in rows
    )
    store = open_store(out)
    by_setting = {}
    for info in store.episodes():
        by_setting.setdefault(info.meta["setting_label"], []).append(store.load(info.id))
    base, steered = by_setting["off"], by_setting["fast=60,up=60"]
    # Same seeds: each steered episode starts where its baseline twin started.
    for b, s in zip(base, steered, strict=True):
        assert np.array_equal(b.arrays["ee_pos"][0], s.arrays["ee_pos"][0])
        assert not b.steering[0]["fast"]["enabled"] and s.steering[0]["fast"]["strength"] == 60.0
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == 4 and all(v.stat().st_size > 0 for v in videos)
    bad = subprocess.run(
        [*cmd[:9], "turbo=1", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "no knobs ['turbo']" in bad.stderr


def test_libero_rotation_is_the_upright_image_mirrored(lift, served):
    """What LIBERO-trained checkpoints saw: the bottom-up render rotated 180 degrees = upright, mirrored."""
    from sim.robosuite_env import RobosuiteEnv

    with Client(served.address) as c:
        info = c.hello()
    cfg = load_sim_config(SIMS / "robosuite_lift.yaml").model_copy(update={"rotate_images_180": True})
    with RobosuiteEnv(cfg, info) as rotated:
        a, b = lift.reset(seed=5).images["agentview"], rotated.reset(seed=5).images["agentview"]
    mirrored, flipped = (
        np.abs(b.astype(int) - a[:, ::-1]).mean(),
        np.abs(b.astype(int) - a[::-1, ::-1]).mean(),
    )
    assert mirrored < 0.1 * flipped, (mirrored, flipped)  # two renderers differ by a few levels at most


class SucceedsAfter(CountingEnv):
    """The real env whose task counts as done from step `k` on (Lift is not solved by a random policy)."""

    def __init__(self, env, k: int):
        super().__init__(env)
        self.k = k

    def reset(self, seed=None):
        self.steps = 0
        return super().reset(seed)

    def success(self) -> bool:
        return self.steps >= self.k


def test_settle_goes_on_after_success_until_the_arm_is_still(lift, served):
    from sim.runner import STILL

    records = []
    with Client(served.address) as client:
        plain = run_episodes(client, SucceedsAfter(lift, 3), n_episodes=1, max_steps=12)
        settled = run_episodes(
            client, SucceedsAfter(lift, 3), n_episodes=1, max_steps=12, settle=2, on_step=records.append
        )
        with pytest.raises(ValueError, match="settle"):
            run_episodes(client, lift, n_episodes=1, max_steps=5, settle=-1)
    assert plain[0].length == 3 and plain[0].success
    assert settled[0].length > 3 and settled[0].success
    speeds = [float(np.linalg.norm(r.step.ee_vel)) for r in records]
    assert settled[0].length == 12 or all(s < STILL for s in speeds[-2:])
