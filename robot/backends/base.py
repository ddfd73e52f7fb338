"""The one small interface the servo loop drives: a UR arm in servo mode, real (ur_rtde) or simulated.

Names follow ur_rtde's (servoL, servoJ, servoStop, initPeriod/waitPeriod, setWatchdog/kickWatchdog), so the
rtde backend is a thin adapter and the MuJoCo backend behaves the way the real controller does.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RobotState:
    """What the loop reads every tick. Poses are [x y z rx ry rz] in the base frame (rotation vector)."""

    tcp_pose: np.ndarray
    tcp_speed: np.ndarray  # [vx vy vz wx wy wz]
    q: np.ndarray
    qd: np.ndarray
    gripper: float = float("nan")  # opening width (m); NaN without a gripper
    safety_mode: int = 1  # UR SafetyMode: 1 NORMAL, 2 REDUCED, 3 PROTECTIVE_STOP, 7 SAFEGUARD_STOP, ...
    robot_mode: int = 7  # UR RobotMode: 7 RUNNING
    protective_stop: bool = False
    emergency_stop: bool = False
    program_running: bool = True  # the ur_rtde control script is running on the controller
    connected: bool = True
    # The MuJoCo twin's lift scene also reports what robosuite's observation holds (None elsewhere):
    eef_quat: np.ndarray | None = None  # robot0_eef_quat: the eef body's orientation (x, y, z, w)
    gripper_joints: np.ndarray | None = None  # robot0_gripper_qpos: the gripper's joints, robosuite's order
    sim_qpos: np.ndarray | None = None  # the whole simulated scene's joints (cube included), for its cameras
    extra: dict = field(default_factory=dict)

    SAFE_MODES = (1, 2)  # NORMAL, REDUCED

    def fault(self) -> str | None:
        """Why the arm cannot be servoed now, or None."""
        if not self.connected:
            return "backend_error"
        if self.emergency_stop:
            return "emergency_stop"
        if self.protective_stop:
            return "protective_stop"
        if self.safety_mode not in self.SAFE_MODES:
            return "safety_mode"
        if not self.program_running:
            return "program_stopped"
        return None


SPIN_S = 0.0004  # busy-wait the last bit of each period: sleep alone overshoots by 0.1-1 ms


def sleep_until(deadline: float, spin: float = SPIN_S) -> None:
    """Sleep, then busy-wait the last `spin` seconds (what ur_rtde's waitPeriod does on the robot PC)."""
    remaining = deadline - time.monotonic()
    if remaining > spin:
        time.sleep(remaining - spin)
    while time.monotonic() < deadline:
        pass


class Backend(abc.ABC):
    """A UR arm. `connect` before anything else; every method may raise on a broken connection."""

    #: the controller's own rate (the servo loop runs at it): 500 Hz e-Series, 125 Hz CB3
    controller_hz: float = 500.0

    @abc.abstractmethod
    def connect(self) -> None: ...

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    @abc.abstractmethod
    def reconnect(self) -> bool:
        """Try once to restore a working connection (control script running); True on success."""

    @abc.abstractmethod
    def state(self) -> RobotState: ...

    @abc.abstractmethod
    def servo_l(self, pose: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None: ...

    @abc.abstractmethod
    def servo_j(self, q: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None: ...

    @abc.abstractmethod
    def servo_stop(self, decel: float) -> None:
        """Leave servo mode, decelerating to a stop."""

    def gripper(self, width: float) -> None:  # noqa: B027 - optional: no gripper by default
        """Command the gripper opening (m). Backends without a gripper ignore it."""

    @abc.abstractmethod
    def move_j(self, q: np.ndarray, speed: float, accel: float) -> None:
        """A blocking joint move (e.g. home). Implementations must leave servo mode first."""

    def set_watchdog(self, min_frequency: float) -> None:  # noqa: B027 - a simulator has nothing to watch
        """Arm the controller-side watchdog: the robot stops if not kicked at `min_frequency`."""

    def kick_watchdog(self) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    def init_period(self) -> float:
        """Start one control period; returns a token for `wait_period`."""

    @abc.abstractmethod
    def wait_period(self, token: float) -> None:
        """Wait for the end of the period begun by `init_period` (the simulator steps physics here)."""


def make_backend(kind: str, config, host: str | None = None, **options) -> Backend:
    """Build a backend by name in the process that will drive it (connections cannot cross processes)."""
    if kind == "mujoco":
        from robot.backends.mujoco import MujocoBackend

        return MujocoBackend(config, **options)
    if kind == "rtde":
        from robot.backends.rtde import RTDEBackend

        if not host:
            raise ValueError("the rtde backend needs --host ROBOT_IP")
        return RTDEBackend(config, host, **options)
    raise ValueError(f"unknown backend {kind!r}; expected 'rtde' or 'mujoco'")
