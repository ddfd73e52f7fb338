"""Fault injection with the MuJoCo backend: a real policy node process, real ZeroMQ sockets, the robot node
with its servo process, MuJoCo physics. Killing the policy node stops the arm and it stays stopped; after a
restart it moves again only when the operator resumes, and only toward actions observed after the resume.
How fast the arm stops after the kill is measured in benchmarks/servo_loop.py, not asserted here."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
import yaml
from robot_support import PageSession, gentle_config, until
from support import VLA_STEER, free_address, wait_for

from robot.control import ControlError, operator_token_path
from robot.shared import Mode, Reason
from vla_steer.core.rollouts import open_store
from vla_steer.wire import generate_keypair

pytest.importorskip("mujoco")

# Servo periods (500 Hz) that show the arm staying put: a count of loop iterations, not a duration.
QUIET_TICKS = 500


def moved(node, since: np.ndarray) -> float:
    return float(np.linalg.norm(node.status().tcp_pose[:3] - since))


def at_rest(node) -> bool:
    return float(np.linalg.norm(node.status().tcp_speed[:3])) < 1e-3


def test_killed_policy_node_stops_the_arm_and_only_the_operator_resumes_it(
    tmp_path, policy_node, robot_node, control
):
    address = free_address()
    policy = policy_node(address)
    # A wide liveness window: this machine is loaded; the kill is seen at once through the dropped connection.
    node = robot_node(address, config=gentle_config(liveness=1.5), out=tmp_path / "runs")
    ctl = control(node.control_address)
    # Mid-motion: following the policy's chunks and actually moving.
    until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
    start = node.status().tcp_pose[:3].copy()
    until(node, lambda: moved(node, start) > 0.005, 20, "the arm to move")
    assert np.linalg.norm(node.status().tcp_speed[:3]) > 1e-3

    policy.kill()
    st = until(node, lambda: (s := node.status()).mode == Mode.STOPPED and s, 5, "the arm to stop")
    assert st.reason == Reason.POLICY_LOST
    policy.wait(10)

    # Stays stopped: the arm comes to rest, and resuming with nothing to follow is refused.
    until(node, lambda: at_rest(node), 10, "the arm to come to rest")
    rest = node.status().tcp_pose[:3].copy()
    with pytest.raises(ControlError, match="not alive"):
        ctl.resume(node.operator_token)

    # A new policy node on the same address: alive again, but the arm waits for the operator.
    policy_node(address)
    until(node, lambda: node.status_dict()["policy_alive"], 10, "the restarted policy node to be seen alive")
    ticks = node.status().ticks
    until(node, lambda: node.status().ticks > ticks + QUIET_TICKS, 20, "the servo loop to run on")
    st = node.status()
    assert st.mode == Mode.STOPPED and st.reason == Reason.POLICY_LOST
    assert moved(node, rest) < 1e-4 and st.chunk_used == 0

    with pytest.raises(ControlError, match="operator act"):
        ctl.resume(None)  # what a policy-side client could send
    t_resume = time.monotonic()
    ctl.resume(node.operator_token)
    st = until(node, lambda: (s := node.status()).mode == Mode.RUNNING and s, 10, "the arm to follow again")
    assert st.resume_t >= t_resume
    t_obs = st.t - st.command_age  # the observation behind the chunk being followed
    assert t_obs > st.resume_t, "followed an action observed before the resume"
    until(node, lambda: moved(node, rest) > 0.002, 10, "the arm to move after the resume")

    # The operator's stop works too, and the episodes were recorded with why they ended.
    ctl.stop()
    until(node, lambda: node.status().mode == Mode.STOPPED, 5, "the operator stop")
    assert node.status().reason == Reason.OPERATOR
    node.close()
    store = open_store(tmp_path / "runs")
    eps = [store.load(e.id, images=False) for e in store.episodes()]
    assert len(eps) >= 2
    stops = [[ev["reason"] for ev in ep.events if ev["kind"] == "stop"] for ep in eps]
    assert stops == [["policy_lost"], ["operator"]]
    assert all(ep.complete and ep.n_steps > 0 for ep in eps)
    assert eps[0].arrays["action_chunk"].shape[1:] == (1, 7)
    # The store's one layout: linear velocity (m/s) and xyzw unit quaternions, said in the metadata.
    assert eps[0].arrays["ee_vel"].shape[1:] == (3,) and eps[0].meta["conventions"]["ee_quat"] == "xyzw"
    assert np.allclose(np.linalg.norm(eps[0].arrays["ee_quat"], axis=1), 1.0, atol=1e-5)


def test_vla_steer_robot_follows_a_policy_node_that_uses_curve_keys_and_only_the_operator_resumes(
    tmp_path, policy_node, processes, control, monkeypatch
):
    """The installed commands: `vla-steer robot` waits for the operator (--no-autostart), resumes on its
    console, keeps its operator token in a file only its user can read; `vla-steer knobs ui` started by the
    same user reads it, and its page stops and resumes the arm."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    keys = tmp_path / "keys"
    server_public, server_secret = generate_keypair(keys / "server", "server")
    _, robot_secret = generate_keypair(keys / "clients", "robot")
    address = free_address()
    policy_node(address, "--keypair", str(server_secret), "--allow-clients", str(keys / "clients"))
    config = tmp_path / "robot.yaml"
    config.write_text(yaml.safe_dump(gentle_config(liveness=1.0).model_dump(mode="json")))
    control_address = free_address()
    key_options = ["--server-key", str(server_public), "--keypair", str(robot_secret)]
    log = tmp_path / "robot.log"
    with log.open("w") as out:
        robot = subprocess.Popen(
            [VLA_STEER, "robot", "--backend", "mujoco", "--config", str(config), "--server", address,
             "--control", control_address, "--infer-timeout", "10", "--no-autostart", *key_options],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    processes.append(robot)
    ctl = control(control_address)

    def status() -> dict | None:
        assert robot.poll() is None, f"vla-steer robot exited: {log.read_text()}"
        try:
            return ctl.status()
        except ControlError:  # not serving yet
            return None

    def following() -> bool:
        return bool(
            (st := status()) and st["policy_alive"] and st["inferences"] > 0 and st["mode"] == "running"
        )

    wait_for(lambda: (st := status()) and st["policy_alive"], 60, what="the robot node to reach the policy")
    assert status()["mode"] == "stopped"  # --no-autostart: it waits for the operator
    token_file = operator_token_path(control_address)
    wait_for(lambda: "operator token in" in log.read_text(), 10, what="the start message")
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert "faults.max_action_age: 5.0" in log.read_text()  # the safety settings, printed at start
    robot.stdin.write("resume\n")  # the operator at the robot's console
    robot.stdin.flush()
    wait_for(following, 60, what="the console's resume")

    ui = subprocess.Popen(
        [VLA_STEER, "knobs", "--server", address, "ui", "--robot", control_address,
         "--port", free_address().rsplit(":", 1)[1], *key_options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    processes.append(ui)
    line = ui.stdout.readline()
    assert "can resume" in line, line
    page = PageSession(line.split()[3])
    assert page.post("/api/stop")[0] == 200
    wait_for(lambda: status()["reason"] == "operator", 10, what="the page's stop")
    assert page.post("/api/resume")[0] == 200
    wait_for(following, 60, what="the page's resume")
    ui.send_signal(signal.SIGTERM)
    robot.send_signal(signal.SIGTERM)
    assert robot.wait(30) == 0, log.read_text()
    assert not token_file.exists()


def test_stale_actions_hold_position_without_stopping():
    """A chunk observed before the resume is never followed: the arm holds (HOLD), it is not stopped."""
    from robot.servo_process import ServoProcess

    servo = ServoProcess("mujoco", gentle_config()).start()
    try:
        sh = servo.shared

        def beating(condition):  # the network side's liveness stamps, while waiting
            return lambda: sh.policy_alive() or condition(sh.status())

        sh.policy_alive()
        servo.resume()
        wait_for(beating(lambda st: st.mode == Mode.HOLD), 10, what="HOLD after resume")
        p0 = sh.status().tcp_pose.copy()
        now = time.monotonic()
        target = np.concatenate([p0 + np.array([0.05, 0, 0, 0, 0, 0]), [0.08]])
        sh.write_chunk(np.array([now + 0.5]), target[None], t_obs=now - 10.0)  # observed 10 s ago
        ticks = sh.status().ticks
        wait_for(beating(lambda st: st.ticks > ticks + QUIET_TICKS), 20, what="the servo loop to run on")
        st = sh.status()
        assert st.mode == Mode.HOLD and np.linalg.norm(st.tcp_pose[:3] - p0[:3]) < 1e-3
        now = time.monotonic()
        sh.write_chunk(np.array([now + 0.3]), target[None], t_obs=now)  # fresh: followed
        wait_for(
            beating(lambda st: np.linalg.norm(st.tcp_pose[:3] - target[:3]) < 0.01), 10, what="the target"
        )
    finally:
        servo.close()


def test_resume_while_the_arm_still_slows_down_waits_for_rest():
    """servoStop mid-motion and the operator's resume at once: the loop keeps the resume pending while the
    measured TCP speed is above the rest thresholds, then holds at the measured pose, then follows only a
    chunk observed after that. The twin steps in simulated time (no clock: one servo period per tick)."""
    from robot.backends.mujoco import MujocoBackend
    from robot.config import load_robot_config
    from robot.servo import ServoLoop
    from robot.shared import Cmd, Shared

    cfg = load_robot_config("ur5e_mujoco")  # its own limits: fast enough that stopping takes many ticks
    sh, backend = Shared(), MujocoBackend(cfg, realtime=False)
    loop = ServoLoop(backend, sh, cfg, autostart=False)
    backend.connect()
    now = time.monotonic()

    def step() -> None:
        nonlocal now
        now += cfg.dt
        sh.policy_alive(now)  # the policy node answers all along
        token = backend.init_period()
        loop.tick(now)
        backend.wait_period(token)

    def speed() -> float:
        return float(np.linalg.norm(loop.state.tcp_speed[:3]))

    loop._start()
    sh.command(Cmd.RESUME)
    step()
    assert loop.mode == Mode.HOLD  # at rest at home: the resume takes effect at once
    goal = loop.state.tcp_pose + np.array([0.2, 0, 0, 0, 0, 0])
    step()  # a chunk observed after the resume
    sh.write_chunk(np.array([now + 1.0]), np.concatenate([goal, [0.08]])[None], t_obs=now)
    for _ in range(2000):
        step()
        if speed() > 0.1:
            break
    assert loop.mode == Mode.RUNNING and speed() > 0.1, "the arm did not get moving"

    sh.command(Cmd.STOP)
    sh.command(Cmd.RESUME)  # while it slows down
    rest = cfg.faults.rest_linear_speed
    waited = []
    for _ in range(5000):
        step()
        if loop.mode != Mode.STOPPED:
            break
        assert loop.resume_pending and sh.status().resume_pending
        waited.append(speed())
    assert loop.mode == Mode.HOLD and not loop.resume_pending
    assert waited and max(waited) > 0.05, "the resume was not asked while the arm still moved"
    assert speed() < rest and np.linalg.norm(loop.state.tcp_speed[3:]) < cfg.faults.rest_angular_speed
    assert np.allclose(loop.filter.pose, loop.state.tcp_pose, atol=1e-9)  # filters start at the rest pose
    assert loop.resume_t == now

    # Holding there: the chunk from before the stop is not followed; a fresh one is.
    held = loop.state.tcp_pose[:3].copy()
    for _ in range(QUIET_TICKS):
        step()
    assert loop.mode == Mode.HOLD and np.linalg.norm(loop.state.tcp_pose[:3] - held) < 1e-3
    sh.write_chunk(np.array([now + 1.0]), np.concatenate([goal, [0.08]])[None], t_obs=now)
    step()
    assert loop.mode == Mode.RUNNING


def test_a_camera_that_drops_frames_holds_the_arm_until_frames_flow_again(tmp_path, policy_node, robot_node):
    """Recorded frames (the stand-in for a real camera, through the same StreamCamera) reach the policy;
    when the camera drops frames beyond its bound the node holds the arm, as for a stale action, and sends
    no chunk; once frames flow again it follows fresh chunks."""
    from robot.config import Camera

    recording = np.stack([np.full((48, 64, 3), 10 * (i + 1), np.uint8) for i in range(20)])
    np.save(tmp_path / "frames.npy", recording)
    cfg = gentle_config(liveness=1.0)
    cam = Camera(
        source="recorded", path=str(tmp_path / "frames.npy"), fps=30, max_frame_age=0.5, max_dropped=3
    )
    cfg = cfg.model_copy(
        update={"observation": cfg.observation.model_copy(update={"cameras": {"agentview": cam}})}
    )
    address = free_address()
    policy_node(address)
    node = robot_node(address, config=cfg, out=tmp_path / "runs")
    until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
    source = node.cameras["agentview"].source

    source.at_end, source.i = "drop", len(source.frames)  # the camera stops delivering frames
    until(node, lambda: node.status_dict()["camera_hold"], 10, "the node to see the stale camera")
    until(node, lambda: node.status().mode == Mode.HOLD, 10, "the arm to hold")
    d = node.status_dict()
    assert "camera 'agentview'" in d["last_error"] and not d["cameras"]["agentview"]["ok"]
    inferences, ticks = d["inferences"], d["ticks"]
    until(node, lambda: node.status().ticks > ticks + QUIET_TICKS, 20, "the servo loop to run on")
    assert node.status().mode == Mode.HOLD and node.stats.inferences == inferences  # blind: no chunk sent

    source.at_end = "loop"  # frames again
    until(node, lambda: node.stats.inferences > inferences + 1, 30, "inference on fresh frames")
    until(node, lambda: node.status().mode == Mode.RUNNING, 10, "the arm to follow again")
    node.close()
    store = open_store(tmp_path / "runs")
    images = np.concatenate([store.load(e.id).images["agentview"] for e in store.episodes()])
    assert images.shape[1:] == (32, 32, 3)  # resized to the policy's size
    assert set(np.unique(images)) <= set(np.unique(recording))  # the recorded frames, nothing else
