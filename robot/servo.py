"""The servo loop: at the controller's rate, never waiting on the network (robot.servo_process runs it
in its own process).

Every period it (1) takes operator commands and the newest action chunk from shared memory without
blocking, (2) reads the robot's state and safety status, (3) decides: follow the chunk (interpolated in
time), hold position (the chunk is older than `faults.max_action_age`), or stop, (4) passes the command
through the safety filter and streams it with servoL/servoJ, (5) kicks the controller's watchdog,
(6) publishes its status, (7) waits for the period's end.

Fail-safes:
- the policy's liveness: the network side stamps `policy_alive_t` whenever the policy node answers (every
  `faults.heartbeat_interval`); older than `faults.policy_liveness` -> servoStop. A dead network side stops
  stamping, so it stops the arm the same way;
- any stop (operator, lost policy, robot fault) is latched: the arm moves again only on an operator's
  resume, and then only toward chunks whose observation was taken after the resume (nothing stale is
  replayed);
- a resume takes effect only from rest: while the arm still slows down after servoStop, the request waits
  (`resume_pending`) until the measured TCP speed is below `faults.rest_linear_speed` and
  `faults.rest_angular_speed`; then the filters start at rest at the measured pose, the arm holds, and it
  follows the first chunk observed after that moment. A resume still waiting after `faults.resume_timeout`
  is dropped (the operator asks again);
- protective/emergency stops, safety mode and the control script are watched every tick; a fault issues
  servoStop and retries the connection every `faults.reconnect_interval`; recovering lands in STOPPED;
- servoStop always runs in `finally`, whatever ended the loop.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robot.backends.base import Backend, RobotState
from robot.config import RobotConfig
from robot.geometry import mat_to_rotvec, rotvec_to_mat
from robot.safety import GripperFilter, JointFilter, JointGuard, PoseFilter
from robot.shared import MAX_GRIPPER_JOINTS, MAX_SIM_QPOS, Cmd, Mode, Reason, Shared

log = logging.getLogger(__name__)
OVERRUN_S = 0.002  # a period this much longer than dt counts as an overrun
_REASONS = {
    "protective_stop": Reason.PROTECTIVE_STOP,
    "emergency_stop": Reason.EMERGENCY_STOP,
    "safety_mode": Reason.SAFETY_MODE,
    "program_stopped": Reason.PROGRAM_STOPPED,
    "backend_error": Reason.BACKEND_ERROR,
}


@dataclass
class Trajectory:
    """Waypoints in time: the command when the chunk arrived, then the chunk's future waypoints."""

    times: np.ndarray  # (n,)
    points: np.ndarray  # (n, 7): pose (rotation vector) or joints, then gripper
    t_obs: float
    seq: int
    joints: bool

    def sample(self, t: float) -> np.ndarray:
        times, pts = self.times, self.points
        if t <= times[0]:
            return pts[0]
        if t >= times[-1]:
            return pts[-1]
        i = int(np.searchsorted(times, t)) - 1
        s = (t - times[i]) / (times[i + 1] - times[i])
        a, b = pts[i], pts[i + 1]
        out = a + s * (b - a)
        if not self.joints:  # rotations interpolate along the geodesic, not per component
            Ra = rotvec_to_mat(a[3:6])
            out[3:6] = mat_to_rotvec(Ra @ rotvec_to_mat(s * mat_to_rotvec(Ra.T @ rotvec_to_mat(b[3:6]))))
        return out


class ServoLoop:
    """Drives `backend` from `shared`. `run()` returns after a SHUTDOWN command or `max_ticks` periods."""

    def __init__(
        self,
        backend: Backend,
        shared: Shared,
        config: RobotConfig,
        *,
        autostart: bool = True,
        max_ticks: int | None = None,
        trace_path: str | os.PathLike | None = None,
        trace_ticks: int = 0,
    ):
        self.b = backend
        self.sh = shared
        self.cfg = config
        self.dt = config.dt
        self.joints = config.servo == "servoJ"
        self.filter: PoseFilter | JointFilter = (
            JointFilter(config.limits, self.dt) if self.joints else PoseFilter(config.limits, self.dt)
        )
        self.grip = GripperFilter(config.limits, self.dt)
        self.guard = JointGuard(config.limits, config.faults.joint_margin)
        self.autostart = autostart
        self.max_ticks = max_ticks
        self.mode = Mode.STOPPED
        self.reason = Reason.STARTUP
        self.traj: Trajectory | None = None
        self.chunk_seq = 0
        self.resume_t = 0.0
        self.hold_t = 0.0  # the last HOLD command: chunks observed before it are not followed
        self.resume_pending = False
        self.resume_deadline = 0.0
        self.stop_t = 0.0
        self.ticks = 0
        self.overruns = 0
        self.period = 0.0
        self.period_max = 0.0
        self.command_age = float("nan")
        self.next_reconnect = 0.0
        self.shutdown = False
        self.state: RobotState | None = None
        self.trace_path = Path(trace_path) if trace_path else None
        self._trace = np.full((trace_ticks, 3), np.nan) if trace_ticks else None

    # -- lifecycle

    def run(self) -> None:
        self.sh.publish(servo_pid=os.getpid())
        try:
            self.b.connect()
            self.b.set_watchdog(self.cfg.faults.watchdog_min_hz)
            self._start()
            # No collector pauses in the loop: automatic collection off, and what exists now is moved out of
            # the collector's reach. No gc.collect() first: in a process with other threads (the tests run
            # the loop in theirs) it can reach a leaked ZeroMQ context's finalizer, whose term() blocks.
            gc.freeze()
            gc.disable()
            last = time.monotonic()
            while not self.shutdown and (self.max_ticks is None or self.ticks < self.max_ticks):
                token = self.b.init_period()
                now = time.monotonic()
                if self.ticks:
                    self.period = now - last
                    self.period_max = max(self.period_max, self.period)
                    self.overruns += self.period > self.dt + OVERRUN_S
                last = now
                self.tick(now)
                if self._trace is not None and self.ticks < len(self._trace):
                    self._trace[self.ticks] = (now, self.period, self.command_age)
                self.ticks += 1
                self.b.wait_period(token)
        finally:
            gc.enable()
            gc.unfreeze()  # leave the interpreter as found (the loop may run in a caller's process)
            try:
                self.b.servo_stop(self.cfg.faults.stop_decel)  # whatever ended the loop
            except Exception as e:  # noqa: BLE001 - a dead connection must not hide the original error
                log.error("servoStop at exit failed: %s", e)
            self.mode = Mode.STOPPED if self.mode != Mode.FAULT else Mode.FAULT
            self.reason = Reason.SHUTDOWN if self.reason == Reason.NONE else self.reason
            self.stop_t = time.monotonic()
            self._publish(exited=1.0)
            with contextlib.suppress(Exception):
                self.b.disconnect()
            if self._trace is not None and self.trace_path is not None:
                np.save(self.trace_path, self._trace[: self.ticks])

    def _start(self) -> None:
        self.state = st = self.b.state()
        fault = st.fault()
        if fault is not None:
            self._fault(_REASONS[fault], time.monotonic(), stop=False)
            return
        try:
            self._sync_filters(st)
        except ValueError as e:
            log.error("cannot start servoing: %s", e)
            self._fault(Reason.STARTUP, time.monotonic(), stop=False)
            return
        if self.autostart:
            now = time.monotonic()
            self._request_resume(now)
            self._resume_at_rest(st, now)
        self._publish(started=1.0)

    def _sync_filters(self, st: RobotState) -> None:
        self.filter.reset(st.q if self.joints else st.tcp_pose)
        self.grip.reset(st.gripper)

    # -- one period

    def tick(self, now: float) -> None:
        cmds, chunk, _ = self.sh.poll(self.chunk_seq)
        for c in cmds:
            if c == Cmd.STOP:
                self._stop(Reason.OPERATOR, now)
            elif c == Cmd.RESUME:
                self._request_resume(now)
            elif c == Cmd.SHUTDOWN:
                self.shutdown = True
            elif c == Cmd.HOLD:  # as for a stale action: hold, follow only chunks observed from now on
                self.traj, self.hold_t = None, now
        if chunk is not None:
            self._take_chunk(chunk, now)
        try:
            self.state = st = self.b.state()
            fault = st.fault()
        except Exception as e:  # noqa: BLE001 - a broken connection is a fault like any other
            log.error("reading the robot failed: %s", e)
            st, fault = self.state, "backend_error"
            if st is not None:
                st.connected = False
        if fault is not None and self.mode != Mode.FAULT:
            self._fault(_REASONS[fault], now)
        if self.mode == Mode.FAULT:
            self._recover(now)
        elif self.mode == Mode.STOPPED and self.resume_pending:
            self._resume_at_rest(st, now)
        elif self.mode in (Mode.RUNNING, Mode.HOLD):
            if not self._policy_alive(now):
                self._stop(Reason.POLICY_LOST, now)
            elif not self.joints and (why := self.guard.violation(st.q)):
                log.error("joint limit: %s", why)
                self._stop(Reason.JOINT_LIMIT, now)
            else:
                self._servo(now)
        if self.mode != Mode.FAULT:
            try:
                self.b.kick_watchdog()
            except Exception as e:  # noqa: BLE001
                log.error("kicking the watchdog failed: %s", e)
                self._fault(Reason.BACKEND_ERROR, now)
        self._publish()

    def _servo(self, now: float) -> None:
        target = None
        if self.traj is not None:
            self.command_age = now - self.traj.t_obs
            if self.command_age <= self.cfg.faults.max_action_age:
                target = self.traj.sample(now)
        if target is None:  # no fresh action: hold where the command is (the filter brakes smoothly)
            self.mode = Mode.HOLD
            cmd = self.filter(self.filter.q if self.joints else self.filter.pose)
            width = self.grip(self.grip.x)
        else:
            self.mode = Mode.RUNNING
            cmd = self.filter(target[:6])
            width = self.grip(target[6])
        p = self.cfg.servo_params
        try:
            if self.joints:
                self.b.servo_j(cmd, self.dt, p.lookahead_time, p.gain)
            else:
                self.b.servo_l(cmd, self.dt, p.lookahead_time, p.gain)
            self.b.gripper(width)
        except Exception as e:  # noqa: BLE001
            log.error("servo command failed: %s", e)
            self._fault(Reason.BACKEND_ERROR, now)

    def _take_chunk(self, chunk: tuple[int, float, np.ndarray, np.ndarray], now: float) -> None:
        seq, t_obs, times, wps = chunk
        self.chunk_seq = seq
        if t_obs <= max(self.resume_t, self.hold_t) or self.mode not in (Mode.RUNNING, Mode.HOLD):
            return  # observed before the last resume or hold, or not servoing: never replayed later
        future = times > now
        start = np.concatenate([self.filter.q if self.joints else self.filter.pose, [self.grip.x]])
        if future.any():
            times_ = np.concatenate([[now], times[future]])
            points = np.vstack([start, wps[future]])
        else:
            times_, points = np.array([now]), wps[-1:].copy()
        self.traj = Trajectory(times_, points, t_obs, seq, self.joints)

    # -- state changes

    def _stop(self, reason: Reason, now: float) -> None:
        if self.mode in (Mode.RUNNING, Mode.HOLD):
            try:
                self.b.servo_stop(self.cfg.faults.stop_decel)
            except Exception as e:  # noqa: BLE001
                log.error("servoStop failed: %s", e)
                self._fault(Reason.BACKEND_ERROR, now)
                return
            self.stop_t = now
            self.mode = Mode.STOPPED
            self.reason = reason
        elif self.mode == Mode.STOPPED and reason == Reason.OPERATOR:
            self.reason = reason
        self.traj = None
        self.resume_pending = False  # a stop cancels a resume still waiting for rest

    def _fault(self, reason: Reason, now: float, stop: bool = True) -> None:
        log.error("robot fault: %s", reason.name)
        if stop:
            with contextlib.suppress(Exception):  # the connection may be what failed
                self.b.servo_stop(self.cfg.faults.stop_decel)
            self.stop_t = now
        self.mode, self.reason, self.traj = Mode.FAULT, reason, None
        self.resume_pending = False
        self.next_reconnect = now + self.cfg.faults.reconnect_interval

    def _recover(self, now: float) -> None:
        if now < self.next_reconnect:
            return
        self.next_reconnect = now + self.cfg.faults.reconnect_interval
        try:
            if not self.b.reconnect():
                return
            st = self.b.state()
            if st.fault() is not None:
                return
            self._sync_filters(st)
            self.b.set_watchdog(self.cfg.faults.watchdog_min_hz)
        except Exception as e:  # noqa: BLE001
            log.warning("reconnect failed: %s", e)
            return
        self.state = st
        self.mode = Mode.STOPPED  # reason kept: the operator sees why, and resumes
        log.warning("robot recovered from %s; waiting for the operator to resume", self.reason.name)

    def _policy_alive(self, now: float) -> bool:
        return now - self.sh.policy_alive_t() <= self.cfg.faults.policy_liveness

    def _request_resume(self, now: float) -> None:
        """The operator's resume: taken from STOPPED only; it takes effect once the arm is at rest."""
        if self.mode != Mode.STOPPED:
            return
        if not self._policy_alive(now):
            log.warning("resume refused: the policy node is not alive")
            return
        self.resume_pending = True
        self.resume_deadline = now + self.cfg.faults.resume_timeout

    def at_rest(self, st: RobotState | None) -> bool:
        """Whether the measured TCP speed is below the rest thresholds (unknown speed is not rest)."""
        if st is None:
            return False
        f = self.cfg.faults
        v, w = np.linalg.norm(st.tcp_speed[:3]), np.linalg.norm(st.tcp_speed[3:6])
        return bool(v < f.rest_linear_speed and w < f.rest_angular_speed)  # NaN compares False

    def _resume_at_rest(self, st: RobotState | None, now: float) -> None:
        if not self._policy_alive(now):
            log.warning("resume dropped: the policy node was lost while the arm came to rest")
            self.resume_pending = False
            return
        if not self.at_rest(st):
            if now > self.resume_deadline:
                log.warning(
                    "resume dropped: the arm did not come to rest within %s s", self.cfg.faults.resume_timeout
                )
                self.resume_pending = False
            return
        self.resume_pending = False
        try:
            self._sync_filters(st)  # start at rest where the arm is, not from a stale command
        except ValueError as e:
            log.error("resume refused: %s", e)
            return
        self.resume_t = now
        self.traj = None
        self.mode, self.reason = Mode.HOLD, Reason.NONE

    def _publish(self, **extra: float) -> None:
        st = self.state
        values: dict[str, Any] = {
            "mode": float(self.mode),
            "reason": float(self.reason),
            "t": time.monotonic(),
            "ticks": self.ticks,
            "overruns": self.overruns,
            "period": self.period,
            "period_max": self.period_max,
            "command_age": self.command_age,
            "stop_t": self.stop_t,
            "resume_t": self.resume_t,
            "resume_pending": float(self.resume_pending),
            "rejected": self.filter.stats.rejected,
            "limited": self.filter.stats.limited,
            "chunk_used": self.traj.seq if self.traj is not None else 0,
            "cmd_pose": self.filter.q if self.joints else self.filter.pose,
            **extra,
        }
        if st is not None:
            values.update(
                tcp_pose=st.tcp_pose,
                tcp_speed=st.tcp_speed,
                q=st.q,
                qd=st.qd,
                gripper=st.gripper,
                safety_mode=st.safety_mode,
                robot_mode=st.robot_mode,
                protective_stop=st.protective_stop,
                emergency_stop=st.emergency_stop,
                program_running=st.program_running,
                connected=st.connected,
            )
            values.update(_sim_readings(st))
        self.sh.publish(**values)


_NAN4 = np.full(4, np.nan)


def _sim_readings(st: RobotState) -> dict[str, Any]:
    """The simulated twin's robosuite-side readings as the shared block holds them (padded, with counts)."""
    out: dict[str, Any] = {"eef_quat": _NAN4 if st.eef_quat is None else st.eef_quat}
    if st.gripper_joints is not None:
        n = len(st.gripper_joints)
        out["n_gripper_joints"] = n
        out["gripper_joints"] = np.pad(st.gripper_joints, (0, MAX_GRIPPER_JOINTS - n))
    if st.sim_qpos is not None:
        n = len(st.sim_qpos)
        out["sim_nq"] = n
        out["sim_qpos"] = np.pad(st.sim_qpos, (0, MAX_SIM_QPOS - n))
    return out
