"""The Robotiq 2F-85 driver against a FAKE of the URCap's socket (tests/robot/fake_robotiq.py: the same
ASCII protocol on a real loopback socket; no gripper here), and the gripper's path from the policy's
action through the servo loop's safety filter to the socket."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from fake_robotiq import FakeRobotiq
from support import wait_for
from test_rtde_backend import CFG, FakeRTDEControl, FakeRTDEReceive, FakeUR

from robot.backends.rtde import RTDEBackend
from robot.config import GripperDevice
from robot.gripper import GripperError, RobotiqGripper, pos_to_width, width_to_pos
from robot.servo import ServoLoop
from robot.shared import Cmd, Mode, Shared


@pytest.fixture
def fake():
    server = FakeRobotiq()
    yield server
    server.close()


def test_protocol_round_trip_activates_sets_speed_force_and_follows_positions(fake):
    g = RobotiqGripper("127.0.0.1", fake.port, speed=0.15, force=235.0)
    g.connect()
    try:
        assert fake.lines[:2] == ["GET STA", "SET ACT 1"] and fake.vars["STA"] == 3
        assert "SET SPE 255 FOR 255 GTO 1" in fake.lines
        assert g.get("STA") == 3 and g.width == pytest.approx(0.085)
        g.move(0.0)  # close
        wait_for(lambda: g.width < 1e-3 and g.object == 3, 10, what="the fingers to close")
        assert fake.vars["PRE"] == 255 and fake.sets("FOR")[-1] == 255
        with pytest.raises(GripperError, match="refused 'SET POS 300'"):
            g.set(POS=300)
        with pytest.raises(GripperError, match="unexpected answer to GET XYZ"):
            g.get("XYZ")
    finally:
        g.close()
    assert width_to_pos(0.085) == 0 and width_to_pos(0.0) == 255 and width_to_pos(-1) == 255
    assert pos_to_width(255) == 0.0 and width_to_pos(pos_to_width(100)) == 100


def test_no_gripper_there_is_an_error_not_a_hang():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens
    with pytest.raises(OSError):
        RobotiqGripper("127.0.0.1", port, timeout=1.0).connect()


def test_the_policys_gripper_action_passes_the_safety_filter_before_the_socket(fake):
    """Out-of-range, non-finite and step targets from the policy: the driver only ever gets widths inside
    limits.gripper that change at most max_speed * dt per servo period, and the fake gripper ends where the
    filtered command leads."""
    cfg = CFG.model_copy(update={"gripper": GripperDevice(host="127.0.0.1", port=fake.port, force=100)})
    robot, sh = FakeUR(), Shared()
    backend = RTDEBackend(
        cfg, "192.0.2.10",
        control_factory=lambda h, f: FakeRTDEControl(robot, h, f),
        receive_factory=lambda h, f: FakeRTDEReceive(robot, h, f),
    )  # fmt: skip
    loop = ServoLoop(backend, sh, cfg, autostart=False)
    backend.connect()  # connects and activates the gripper too
    try:
        now = time.monotonic()
        widths = []

        def step(n: int) -> None:
            nonlocal now
            for _ in range(n):
                now += cfg.dt
                sh.policy_alive(now)
                loop.tick(now)
                widths.append(backend._gripper._target)

        loop._start()
        sh.command(Cmd.RESUME)
        step(2)
        assert loop.mode == Mode.HOLD and widths[-1] == pytest.approx(0.085)  # holding the gripper open
        del widths[:-1]
        pose = list(loop.state.tcp_pose)
        for target in (-5.0, math.nan, 0.5, 0.02):  # below the range, NaN, above it, inside
            for _ in range(4):  # a step target, refreshed within faults.max_action_age
                sh.write_chunk(np.array([now + 0.01]), np.array([[*pose, target]]), t_obs=now)
                step(200)
        lim = cfg.limits.gripper
        w = np.array(widths)
        assert np.all((w >= lim.min) & (w <= lim.max))
        assert np.abs(np.diff(w)).max() <= lim.max_speed * cfg.dt + 1e-12
        assert loop.grip.stats.rejected > 0 and w[-1] == pytest.approx(0.02)
        wait_for(lambda: abs(backend._gripper.width - 0.02) < 0.001, 10, what="the gripper at 20 mm")
        assert fake.sets("FOR") and set(fake.sets("FOR")) == {round((100 - 20) / 215 * 255)}
        assert all(0 <= p <= 255 for p in fake.sets("POS"))
    finally:
        backend.disconnect()
    assert "GET STA" in fake.lines
