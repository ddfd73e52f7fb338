"""A real UR through ur_rtde (`pip install ur-rtde`): RTDEControlInterface + RTDEReceiveInterface.

A thin adapter: the servo loop's calls map one to one onto ur_rtde's (servoL/servoJ/servoStop,
initPeriod/waitPeriod, setWatchdog/kickWatchdog, moveJ). The receive interface is opened first (it
reports a protective stop even when the control script cannot run). ur_rtde is imported lazily, so the
rest of the package works without it; `control_factory`/`receive_factory` replace the two classes (tests
use fakes of their API, since no robot or URSim runs there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from robot.backends.base import Backend, RobotState
from robot.config import RobotConfig

log = logging.getLogger(__name__)


class RTDEError(RuntimeError):
    """ur_rtde reported a failed command (it returns False rather than raising)."""


def _import_rtde() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        import rtde_control
        import rtde_receive
    except ImportError as e:
        raise ImportError(
            "the rtde backend needs ur_rtde: pip install ur-rtde (or use --backend mujoco for a dry run)"
        ) from e
    return rtde_control.RTDEControlInterface, rtde_receive.RTDEReceiveInterface


class RTDEBackend(Backend):
    def __init__(
        self,
        config: RobotConfig,
        host: str,
        *,
        control_factory: Callable[..., Any] | None = None,
        receive_factory: Callable[..., Any] | None = None,
        gripper: Any = None,
    ):
        self.config = config
        self.host = host
        self.controller_hz = config.controller_hz
        self._factories = (control_factory, receive_factory)
        if gripper is None and config.gripper is not None:  # the configured driver (robot/gripper.py)
            from robot.gripper import RobotiqGripper

            g = config.gripper
            gripper = RobotiqGripper(
                g.host or host, g.port, speed=config.limits.gripper.max_speed, force=g.force
            )
        self._gripper = gripper  # optional: connect(), move(width_m), width, close()
        self.cc: Any = None
        self.rc: Any = None

    def connect(self) -> None:
        control, receive = self._factories
        if control is None or receive is None:
            real_control, real_receive = _import_rtde()
            control, receive = control or real_control, receive or real_receive
        self.rc = receive(self.host, self.controller_hz)
        self.cc = control(self.host, self.controller_hz)
        if self._gripper is not None:
            self._gripper.connect()

    def disconnect(self) -> None:
        if self._gripper is not None:
            self._gripper.close()
        if self.cc is not None:
            try:
                self.cc.servoStop()
                self.cc.stopScript()
            finally:
                self.cc.disconnect()
        if self.rc is not None:
            self.rc.disconnect()

    def reconnect(self) -> bool:
        """Reconnect both interfaces and re-upload the control script. A protective or emergency stop is
        never cleared from here: a person must unlock it on the teach pendant first."""
        if not self.rc.isConnected():
            self.rc.reconnect()
        if not self.cc.isConnected():
            self.cc.reconnect()
        if self.rc.isProtectiveStopped() or self.rc.isEmergencyStopped():
            return False
        if not self.cc.isProgramRunning():
            self.cc.reuploadScript()
        return bool(self.cc.isConnected() and self.cc.isProgramRunning())

    def state(self) -> RobotState:
        rc, cc = self.rc, self.cc
        return RobotState(
            tcp_pose=np.asarray(rc.getActualTCPPose(), dtype=float),
            tcp_speed=np.asarray(rc.getActualTCPSpeed(), dtype=float),
            q=np.asarray(rc.getActualQ(), dtype=float),
            qd=np.asarray(rc.getActualQd(), dtype=float),
            gripper=self._gripper.width if self._gripper is not None else float("nan"),
            safety_mode=int(rc.getSafetyMode()),
            robot_mode=int(rc.getRobotMode()),
            protective_stop=bool(rc.isProtectiveStopped()),
            emergency_stop=bool(rc.isEmergencyStopped()),
            program_running=bool(cc.isProgramRunning()),
            connected=bool(rc.isConnected() and cc.isConnected()),
        )

    def servo_l(self, pose: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        # speed and acceleration are not used by the controller in servo mode
        if self.cc.servoL([float(x) for x in pose], 0.0, 0.0, dt, lookahead_time, gain) is False:
            raise RTDEError("servoL was refused")

    def servo_j(self, q: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        if self.cc.servoJ([float(x) for x in q], 0.0, 0.0, dt, lookahead_time, gain) is False:
            raise RTDEError("servoJ was refused")

    def servo_stop(self, decel: float) -> None:
        self.cc.servoStop(decel)

    def gripper(self, width: float) -> None:
        if self._gripper is not None:
            self._gripper.move(width)

    def move_j(self, q: np.ndarray, speed: float = 0.5, accel: float = 1.0) -> None:
        self.cc.servoStop()  # a move while in servo mode is refused by the controller
        if self.cc.moveJ([float(x) for x in q], speed, accel) is False:
            raise RTDEError("moveJ was refused")

    def set_watchdog(self, min_frequency: float) -> None:
        self.cc.setWatchdog(min_frequency)

    def kick_watchdog(self) -> None:
        self.cc.kickWatchdog()

    def init_period(self) -> Any:
        return self.cc.initPeriod()

    def wait_period(self, token: Any) -> None:
        self.cc.waitPeriod(token)
