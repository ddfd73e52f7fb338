"""Fault injection with the MuJoCo backend: a real policy node process, real ZeroMQ sockets, the robot node
with its servo process, MuJoCo physics. Killing the policy node stops the arm within 100 ms (the one
latency bound the issue asks to test) and it stays stopped; after a restart it moves again only when the
operator resumes, and only toward actions observed after the resume."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from support import free_address, serve_process

from robot.config import load_robot_config
from robot.control import ControlClient, ControlError
from robot.node import RobotNode
from robot.shared import Mode, Reason
from vla_steer.core.rollouts import open_store

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("mujoco")


def gentle_config(liveness: float = 0.5):
    """The shipped MuJoCo config with small per-step deltas, so a random policy moves the arm gently, and a
    liveness window wide enough for this shared, loaded test machine (a killed node is seen at once
    through its dropped connection, whatever the window)."""
    cfg = load_robot_config("ur5e_mujoco")
    act = cfg.action.model_copy(update={"translation_scale": 0.01, "rotation_scale": 0.02})
    # Inference here takes up to a second under load: chunks stay usable for 5 s.
    faults = cfg.faults.model_copy(
        update={"policy_liveness": liveness, "heartbeat_interval": 0.02, "max_action_age": 5.0}
    )
    obs = cfg.observation.model_copy(update={"cameras": {}})  # black frames: CPU rendering is ~0.2 s here
    return cfg.model_copy(update={"action": act, "faults": faults, "observation": obs})


def wait_for(cond, timeout: float, what: str, poll: float = 0.002, node=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    extra = f"; node status {node.status_dict()}" if node is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")


def moved(node, since: np.ndarray) -> float:
    return float(np.linalg.norm(node.status().tcp_pose[:3] - since))


@pytest.fixture
def policy_address():
    return free_address()


def test_killed_policy_node_stops_the_arm_and_only_the_operator_resumes_it(
    checkpoint, tmp_path, policy_address
):
    policy = serve_process(checkpoint, policy_address)
    node = None
    try:
        node = RobotNode(
            gentle_config(),
            "mujoco",
            server=policy_address,
            control=free_address(),
            out=tmp_path / "runs",
            infer_timeout=10.0,
        ).start()
        ctl = ControlClient(node.control_address, timeout=2.0)
        # Mid-motion: following the policy's chunks and actually moving.
        wait_for(lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy", node=node)
        start = node.status().tcp_pose[:3].copy()
        wait_for(lambda: moved(node, start) > 0.005, 20, "the arm to move", node=node)
        assert np.linalg.norm(node.status().tcp_speed[:3]) > 1e-3

        t_kill = time.monotonic()
        policy.kill()
        st = wait_for(lambda: (s := node.status()).mode == Mode.STOPPED and s, 2.0, "the arm to stop")
        assert st.reason == Reason.POLICY_LOST
        assert st.stop_t - t_kill <= 0.100, f"servoStop {1e3 * (st.stop_t - t_kill):.1f} ms after the kill"
        policy.wait(10)

        # Stays stopped: the arm comes to rest and does not move again.
        time.sleep(0.6)
        rest = node.status().tcp_pose[:3].copy()
        assert np.linalg.norm(node.status().tcp_speed[:3]) < 1e-3
        with pytest.raises(ControlError, match="not alive"):
            ctl.resume()  # nothing to follow: refused
        time.sleep(0.3)
        assert node.status().mode == Mode.STOPPED and moved(node, rest) < 1e-4

        # A new policy node on the same address: alive again, but the arm waits for the operator.
        policy = serve_process(checkpoint, policy_address)
        wait_for(lambda: ctl.status()["policy_alive"], 10, "the restarted policy node to be seen alive")
        time.sleep(1.0)
        st = node.status()
        assert st.mode == Mode.STOPPED and st.reason == Reason.POLICY_LOST
        assert moved(node, rest) < 1e-4 and st.chunk_used == 0

        t_resume = time.monotonic()
        ctl.resume()
        st = wait_for(lambda: (s := node.status()).mode == Mode.RUNNING and s, 10, "the arm to follow again")
        assert st.resume_t >= t_resume
        t_obs = st.t - st.command_age  # the observation behind the chunk being followed
        assert t_obs > st.resume_t, "followed an action observed before the resume"
        wait_for(lambda: moved(node, rest) > 0.002, 10, "the arm to move after the resume")

        # The operator's stop works too, and the episodes were recorded with why they ended.
        ctl.stop()
        wait_for(lambda: node.status().mode == Mode.STOPPED, 1.0, "the operator stop")
        assert node.status().reason == Reason.OPERATOR
    finally:
        if node is not None:
            node.close()
        policy.kill()
        policy.wait(10)
    store = open_store(tmp_path / "runs")
    eps = [store.load(e.id, images=False) for e in store.episodes()]
    assert len(eps) >= 2
    stops = [[ev["reason"] for ev in ep.events if ev["kind"] == "stop"] for ep in eps]
    assert stops == [["policy_lost"], ["operator"]]
    assert all(ep.complete and ep.n_steps > 0 for ep in eps)
    assert eps[0].arrays["action_chunk"].shape[1:] == (1, 7)


def test_stale_actions_hold_position_without_stopping(tmp_path):
    """No chunk newer than max_action_age: the arm holds (HOLD), it is not stopped, and nothing latches."""
    from robot.servo import ServoProcess

    cfg = gentle_config()
    servo = ServoProcess("mujoco", cfg).start()
    try:
        sh = servo.shared
        sh.policy_alive()
        servo.resume()

        def beating_and_holding():
            sh.policy_alive()  # stand-in for the network side's liveness stamps
            return sh.status().mode == Mode.HOLD

        wait_for(beating_and_holding, 10, "HOLD after resume")
        p0 = sh.status().tcp_pose.copy()
        now = time.monotonic()
        target = np.concatenate([p0 + np.array([0.05, 0, 0, 0, 0, 0]), [0.08]])
        sh.write_chunk(np.array([now + 0.5]), target[None], t_obs=now - 10.0)  # observed 10 s ago
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            sh.policy_alive()
            time.sleep(0.005)
        st = sh.status()
        assert st.mode == Mode.HOLD and np.linalg.norm(st.tcp_pose[:3] - p0[:3]) < 1e-3
        now = time.monotonic()
        sh.write_chunk(np.array([now + 0.3]), target[None], t_obs=now)  # fresh: followed
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            sh.policy_alive()
            time.sleep(0.005)
        st = sh.status()
        assert np.linalg.norm(st.tcp_pose[:3] - target[:3]) < 0.01
    finally:
        servo.close()
