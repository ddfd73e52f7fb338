"""The rtde backend driven by the real servo loop against FAKES of ur_rtde's rtde_control/rtde_receive API
(no UR and no URSim can run here): the loop calls the right methods in the right order."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from robot.backends.rtde import RTDEBackend
from robot.config import load_robot_config
from robot.servo import ServoLoop
from robot.shared import Cmd, Mode, Reason, Shared

CFG = load_robot_config("ur5e")
FAULTS = CFG.faults.model_copy(update={"reconnect_interval": 0.02, "policy_liveness": 0.5})
CFG = CFG.model_copy(update={"faults": FAULTS, "gripper": None})  # the gripper: test_gripper.py
HOME_POSE = [-0.4, -0.2, 0.3, 0.0, 3.14, 0.0]


class FakeUR:
    """The robot behind the fakes: a TCP that goes where servoL says, and switchable faults."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.pose = list(HOME_POSE)
        self.q = list(CFG.home_q)
        self.protective = False
        self.cc_connected = True  # each interface has its own connection
        self.rc_connected = True
        self.program_running = True
        self.on_tick = None  # scenario hook, run in waitPeriod
        self.tick = 0

    def log(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


class FakeRTDEControl:
    """Fake of rtde_control.RTDEControlInterface (only the methods the backend uses)."""

    def __init__(self, robot: FakeUR, host: str, frequency: float):
        self.r = robot
        robot.log("control.__init__", host, frequency)

    def servoL(self, pose, speed, accel, t, lookahead, gain):  # noqa: N802 - ur_rtde's names
        self.r.log("servoL", list(pose), speed, accel, t, lookahead, gain)
        if self.r.protective or not self.r.program_running:
            return False
        self.r.pose = list(pose)
        return True

    def servoJ(self, q, speed, accel, t, lookahead, gain):  # noqa: N802
        self.r.log("servoJ", list(q), speed, accel, t, lookahead, gain)
        return True

    def servoStop(self, a=10.0):  # noqa: N802
        self.r.log("servoStop", a)
        return True

    def moveJ(self, q, speed, accel):  # noqa: N802
        self.r.log("moveJ", list(q), speed, accel)
        return True

    def setWatchdog(self, min_frequency):  # noqa: N802
        self.r.log("setWatchdog", min_frequency)
        return True

    def kickWatchdog(self):  # noqa: N802
        self.r.log("kickWatchdog")
        return True

    def initPeriod(self):  # noqa: N802
        return time.monotonic()

    def waitPeriod(self, t_start):  # noqa: N802
        if self.r.on_tick is not None:
            self.r.on_tick(self.r.tick)
        self.r.tick += 1
        while time.monotonic() < t_start + CFG.dt:
            time.sleep(0.0002)

    def isProgramRunning(self):  # noqa: N802
        return self.r.program_running

    def isConnected(self):  # noqa: N802
        return self.r.cc_connected

    def reconnect(self):
        self.r.log("control.reconnect")
        self.r.cc_connected = True
        return True

    def reuploadScript(self):  # noqa: N802
        self.r.log("reuploadScript")
        self.r.program_running = True
        return True

    def stopScript(self):  # noqa: N802
        self.r.log("stopScript")

    def disconnect(self):
        self.r.log("control.disconnect")


class FakeRTDEReceive:
    """Fake of rtde_receive.RTDEReceiveInterface."""

    def __init__(self, robot: FakeUR, host: str, frequency: float):
        self.r = robot
        robot.log("receive.__init__", host, frequency)

    def getActualTCPPose(self):  # noqa: N802
        return list(self.r.pose)

    def getActualTCPSpeed(self):  # noqa: N802
        return [0.0] * 6

    def getActualQ(self):  # noqa: N802
        return list(self.r.q)

    def getActualQd(self):  # noqa: N802
        return [0.0] * 6

    def getSafetyMode(self):  # noqa: N802
        return 3 if self.r.protective else 1

    def getRobotMode(self):  # noqa: N802
        return 7

    def isProtectiveStopped(self):  # noqa: N802
        return self.r.protective

    def isEmergencyStopped(self):  # noqa: N802
        return False

    def isConnected(self):  # noqa: N802
        return self.r.rc_connected

    def reconnect(self):
        self.r.log("receive.reconnect")
        self.r.rc_connected = True
        return True

    def disconnect(self):
        self.r.log("receive.disconnect")


def make(robot: FakeUR) -> RTDEBackend:
    return RTDEBackend(
        CFG,
        "192.0.2.10",
        control_factory=lambda h, f: FakeRTDEControl(robot, h, f),
        receive_factory=lambda h, f: FakeRTDEReceive(robot, h, f),
    )


def chunk_to(shared: Shared, pose: list[float], after: float = 0.05) -> None:
    now = time.monotonic()
    shared.write_chunk(np.array([now + after]), np.array([[*pose, 0.05]]), t_obs=now)


def test_fakes_only_use_names_the_real_api_has():
    rtde_control = pytest.importorskip("rtde_control")
    rtde_receive = pytest.importorskip("rtde_receive")
    for fake, real in (
        (FakeRTDEControl, rtde_control.RTDEControlInterface),
        (FakeRTDEReceive, rtde_receive.RTDEReceiveInterface),
    ):
        names = [n for n in vars(fake) if not n.startswith("_")]
        assert [n for n in names if not hasattr(real, n)] == []


def test_servo_loop_order_watchdog_fault_stop_recover_resume():
    robot = FakeUR()
    shared = Shared()
    target = [HOME_POSE[0] + 0.02, *HOME_POSE[1:]]
    marks: dict[str, int] = {}

    def scenario(tick: int) -> None:
        shared.policy_alive()
        if tick == 5:
            chunk_to(shared, target)
        elif tick == 300:
            robot.protective = True  # the arm hit something
            marks["fault"] = len(robot.calls)
        elif tick == 350:
            robot.protective = False  # unlocked on the teach pendant
        elif tick == 450:
            marks["resume"] = len(robot.calls)
            shared.command(Cmd.RESUME)
        elif tick == 455:
            chunk_to(shared, HOME_POSE)

    robot.on_tick = scenario
    shared.policy_alive()  # the network side has heard the policy: autostart may resume
    loop = ServoLoop(make(robot), shared, CFG, max_ticks=600)
    loop.run()
    names = robot.names()

    # Receive opened first, then control; the watchdog armed before the first servo command.
    assert names[:3] == ["receive.__init__", "control.__init__", "setWatchdog"]
    assert robot.calls[2][1] == (CFG.faults.watchdog_min_hz,)
    first_servo = names.index("servoL")
    assert first_servo > names.index("setWatchdog")
    # servoL with the config's dt, lookahead and gain; kicked every period while healthy
    _, (pose, speed, accel, dt, lookahead, gain) = robot.calls[first_servo]
    assert len(pose) == 6 and dt == CFG.dt
    assert (lookahead, gain) == (CFG.servo_params.lookahead_time, CFG.servo_params.gain)
    assert names[: marks["fault"]].count("kickWatchdog") >= 295
    # It got where the chunk said, through the filter (speed-limited, so not in one step).
    moved = [c[1][0][0] for c in robot.calls[: marks["fault"]] if c[0] == "servoL"]
    assert moved[-1] == pytest.approx(target[0], abs=1e-6)
    assert np.max(np.diff(moved)) <= CFG.limits.max_linear_speed * CFG.dt + 1e-12

    # Protective stop: servoStop at once, then no servo command until the operator's resume.
    after_fault = names[marks["fault"] :]
    assert after_fault.index("servoStop") < 3
    between = names[marks["fault"] : marks["resume"]]
    assert "servoL" not in between
    # Recovery does not clear the protective stop itself (no unlock call exists in the loop).
    assert "unlockProtectiveStop" not in names
    # After the resume it moves again toward the fresh chunk.
    assert "servoL" in names[marks["resume"] :]
    # servoStop in finally, then (disconnect) servo mode left again, the script stopped, both closed.
    assert names[-5:] == ["servoStop", "servoStop", "stopScript", "control.disconnect", "receive.disconnect"]
    st = shared.status()
    assert st.exited and st.mode == Mode.STOPPED


def test_lost_connection_faults_reconnects_and_waits_for_the_operator():
    robot = FakeUR()
    shared = Shared()
    marks: dict[str, int] = {}

    def scenario(tick: int) -> None:
        shared.policy_alive()
        if tick == 5:
            chunk_to(shared, [HOME_POSE[0], HOME_POSE[1] + 0.01, *HOME_POSE[2:]])
        elif tick == 50:
            robot.cc_connected = robot.rc_connected = False  # cable pulled
            robot.program_running = False
            marks["lost"] = len(robot.calls)

    robot.on_tick = scenario
    shared.policy_alive()  # the network side has heard the policy: autostart may resume
    loop = ServoLoop(make(robot), shared, CFG, max_ticks=200)
    loop.run()
    names = robot.names()
    after = names[marks["lost"] :]
    assert after[0] == "servoStop"
    assert "receive.reconnect" in after and "control.reconnect" in after and "reuploadScript" in after
    assert after.index("setWatchdog") > after.index("reuploadScript")  # re-armed on the new script
    assert "servoL" not in after  # recovered, but nobody resumed
    assert loop.mode == Mode.STOPPED and loop.reason == Reason.BACKEND_ERROR


def test_lost_policy_stops_and_operator_stop_latches():
    robot = FakeUR()
    shared = Shared()
    marks: dict[str, int] = {}

    def scenario(tick: int) -> None:
        if tick < 60:
            shared.policy_alive()
        if tick == 5:
            chunk_to(shared, HOME_POSE)
        if tick == 60:
            marks["silent"] = len(robot.calls)

    robot.on_tick = scenario
    shared.policy_alive()  # the network side has heard the policy: autostart may resume
    loop = ServoLoop(make(robot), shared, CFG, max_ticks=60 + int(CFG.faults.policy_liveness / CFG.dt) + 40)
    loop.run()
    after = robot.names()[marks["silent"] :]
    assert "servoStop" in after
    stop = after.index("servoStop")
    assert "servoL" not in after[stop:]
    assert loop.reason == Reason.POLICY_LOST


def test_move_j_leaves_servo_mode_first():
    robot = FakeUR()
    backend = make(robot)
    backend.connect()
    backend.move_j(np.array(CFG.home_q))
    names = robot.names()
    assert names[names.index("moveJ") - 1] == "servoStop"


def test_missing_ur_rtde_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rtde_control", None)
    with pytest.raises(ImportError, match="pip install ur-rtde"):
        RTDEBackend(CFG, "192.0.2.10").connect()


def test_rt_priority_the_system_refuses_is_a_clear_error_not_a_silent_fallback(monkeypatch):
    import os
    import subprocess

    from support import VLA_STEER

    from robot.servo_process import check_rt_priority

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with pytest.raises(
        RuntimeError, match=r"refuses real-time priority 50 \(Operation not permitted\).*rtprio"
    ):
        check_rt_priority(50)
    check_rt_priority(0)  # not asked for: nothing to check
    out = subprocess.run([VLA_STEER, "robot", "--backend", "mujoco", "--rt-priority", "1000"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "SCHED_FIFO priorities are 1..99" in out.stderr, out.stderr
