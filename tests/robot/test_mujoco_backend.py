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
from robot_support import gentle_config, until
from support import VLA_STEER, free_address, wait_for

from robot.control import ControlError
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
    node = robot_node(address, out=tmp_path / "runs")
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
        ctl.resume()

    # A new policy node on the same address: alive again, but the arm waits for the operator.
    policy_node(address)
    until(node, lambda: node.status_dict()["policy_alive"], 10, "the restarted policy node to be seen alive")
    ticks = node.status().ticks
    until(node, lambda: node.status().ticks > ticks + QUIET_TICKS, 20, "the servo loop to run on")
    st = node.status()
    assert st.mode == Mode.STOPPED and st.reason == Reason.POLICY_LOST
    assert moved(node, rest) < 1e-4 and st.chunk_used == 0

    t_resume = time.monotonic()
    ctl.resume()
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


def test_vla_steer_robot_follows_a_policy_node_that_uses_curve_keys(
    tmp_path, policy_node, processes, control
):
    keys = tmp_path / "keys"
    server_public, server_secret = generate_keypair(keys / "server", "server")
    _, robot_secret = generate_keypair(keys / "clients", "robot")
    address = free_address()
    policy_node(address, "--keypair", str(server_secret), "--allow-clients", str(keys / "clients"))
    config = tmp_path / "robot.yaml"
    config.write_text(yaml.safe_dump(gentle_config().model_dump(mode="json")))
    control_address = free_address()
    log = tmp_path / "robot.log"
    with log.open("w") as out:
        robot = subprocess.Popen(
            [VLA_STEER, "robot", "--backend", "mujoco", "--config", str(config), "--server", address,
             "--control", control_address, "--infer-timeout", "10",
             "--server-key", str(server_public), "--keypair", str(robot_secret)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    processes.append(robot)
    ctl = control(control_address)

    def following() -> bool:
        assert robot.poll() is None, f"vla-steer robot exited: {log.read_text()}"
        try:
            st = ctl.status()
        except ControlError:  # not serving yet
            return False
        return st["policy_alive"] and st["inferences"] > 0 and st["mode"] == "running"

    wait_for(following, 60, what="the robot node to follow the keyed policy node")
    robot.send_signal(signal.SIGTERM)
    assert robot.wait(30) == 0, log.read_text()


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
