"""Shared memory between the robot node (network side) and its servo process (real-time side).

One block of float64 (`multiprocessing.RawArray`) with named fields, plus one lock that only guards the
writer side of the action chunk and the command ring. The servo process never blocks on it: it tries the
lock without waiting and, if the network side holds it that instant, keeps last tick's copy. Status
flows the other way under a sequence counter (seqlock): the servo process is its only writer and never
waits; readers retry on a torn read.

Timestamps are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process on the machine).
"""

from __future__ import annotations

import enum
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_WAYPOINTS = 64
WAYPOINT_DIM = 7  # 6 (pose with rotation vector, or joints) + gripper width
CMD_SLOTS = 16
MAX_GRIPPER_JOINTS = 8  # robosuite's Robotiq85 has 6
MAX_SIM_QPOS = 64  # the twin's lift scene has 19 (arm 6, gripper 6, cube 7)


class Mode(enum.IntEnum):
    RUNNING = 0  # following the latest fresh chunk
    HOLD = 1  # running, but no fresh action: holding position
    STOPPED = 2  # servoStop issued (operator or lost policy); resumes only on an operator request
    FAULT = 3  # the robot reported a fault or the backend failed; recovers to STOPPED


class Cmd(enum.IntEnum):
    NONE = 0
    STOP = 1
    RESUME = 2
    SHUTDOWN = 3
    HOLD = 4  # drop the chunk being followed and hold (a camera went stale): fresh chunks are followed again


class Reason(enum.IntEnum):
    NONE = 0
    OPERATOR = 1
    POLICY_LOST = 2
    PROTECTIVE_STOP = 3
    EMERGENCY_STOP = 4
    SAFETY_MODE = 5
    PROGRAM_STOPPED = 6
    BACKEND_ERROR = 7
    JOINT_LIMIT = 8
    STARTUP = 9
    SHUTDOWN = 10


_FIELDS: dict[str, int] = {
    # -- written by the network side (under the lock)
    "chunk_seq": 1,
    "chunk_n": 1,
    "chunk_t_obs": 1,  # when the observation the chunk answers was taken
    "chunk_t": MAX_WAYPOINTS,  # waypoint times
    "chunk_wp": MAX_WAYPOINTS * WAYPOINT_DIM,
    "cmd_write": 1,
    "cmd_ring": CMD_SLOTS,
    "policy_alive_t": 1,  # last sign of life of the policy node, refreshed by the network side
    # -- written by the servo process (seqlock)
    "status_seq": 1,
    "mode": 1,
    "reason": 1,
    "t": 1,
    "tcp_pose": 6,
    "tcp_speed": 6,
    "q": 6,
    "qd": 6,
    "gripper": 1,
    # the MuJoCo twin's robosuite-side readings (robot.backends.base.RobotState); NaN / 0 joints elsewhere
    "eef_quat": 4,
    "n_gripper_joints": 1,
    "gripper_joints": MAX_GRIPPER_JOINTS,
    "sim_nq": 1,
    "sim_qpos": MAX_SIM_QPOS,
    "cmd_pose": 6,  # the last command after the safety filter
    "safety_mode": 1,
    "robot_mode": 1,
    "protective_stop": 1,
    "emergency_stop": 1,
    "program_running": 1,
    "connected": 1,
    "ticks": 1,
    "overruns": 1,  # periods longer than dt + 2 ms
    "period": 1,
    "period_max": 1,
    "command_age": 1,  # age of the chunk the last command came from (s)
    "stop_t": 1,  # when the last servoStop was issued
    "resume_t": 1,  # when the last resume took effect: only chunks observed after it are followed
    "resume_pending": 1,  # a resume waits for the arm to come to rest
    "rejected": 1,
    "limited": 1,
    "chunk_used": 1,  # sequence number of the chunk being followed
    "servo_pid": 1,
    "started": 1,
    "exited": 1,
}


@dataclass
class Status:
    """A consistent snapshot of what the servo process last published."""

    mode: Mode
    reason: Reason
    t: float
    tcp_pose: np.ndarray
    tcp_speed: np.ndarray
    q: np.ndarray
    qd: np.ndarray
    gripper: float
    eef_quat: np.ndarray  # (x, y, z, w) of robosuite's eef body, or NaN
    gripper_joints: np.ndarray  # empty without simulated gripper joints
    sim_qpos: np.ndarray  # empty without a simulated scene
    cmd_pose: np.ndarray
    safety_mode: int
    robot_mode: int
    protective_stop: bool
    emergency_stop: bool
    program_running: bool
    connected: bool
    ticks: int
    overruns: int
    period: float
    period_max: float
    command_age: float
    stop_t: float
    resume_t: float
    resume_pending: bool
    rejected: int
    limited: int
    chunk_used: int
    policy_alive_age: float
    started: bool
    exited: bool

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "sim_qpos":
                continue  # the scene's cameras read it; the status page has no use for it
            if isinstance(v, np.ndarray):
                out[k] = [float(x) for x in v]
            elif isinstance(v, enum.Enum):
                out[k] = v.name.lower()
            else:
                out[k] = v
        out["linear_speed"] = float(np.linalg.norm(self.tcp_speed[:3]))
        out["height"] = float(self.tcp_pose[2])
        return out


class Shared:
    """The block and its lock. Picklable into a spawned process (created from a multiprocessing context)."""

    def __init__(self, ctx: Any = None):
        ctx = ctx or mp.get_context("spawn")
        size = sum(_FIELDS.values())
        self._raw = ctx.RawArray("d", size)
        self.lock = ctx.Lock()
        self._attach()
        self.a["policy_alive_t"][0] = -1e9

    def _attach(self) -> None:
        buf = np.frombuffer(self._raw, dtype=np.float64)
        self.a: dict[str, np.ndarray] = {}
        off = 0
        for name, n in _FIELDS.items():
            self.a[name] = buf[off : off + n]
            off += n
        self._cmd_read = int(self.a["cmd_write"][0])

    def __getstate__(self) -> dict[str, Any]:
        return {"_raw": self._raw, "lock": self.lock}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._raw, self.lock = state["_raw"], state["lock"]
        self._attach()

    # -- network side

    def write_chunk(self, times: np.ndarray, waypoints: np.ndarray, t_obs: float) -> int:
        n = len(times)
        if not 0 < n <= MAX_WAYPOINTS or waypoints.shape != (n, WAYPOINT_DIM):
            raise ValueError(
                f"a chunk is 1..{MAX_WAYPOINTS} waypoints of {WAYPOINT_DIM}, got {waypoints.shape}"
            )
        with self.lock:
            self.a["chunk_t"][:n] = times
            self.a["chunk_wp"][: n * WAYPOINT_DIM] = waypoints.reshape(-1)
            self.a["chunk_n"][0] = n
            self.a["chunk_t_obs"][0] = t_obs
            self.a["chunk_seq"][0] += 1
            return int(self.a["chunk_seq"][0])

    def command(self, cmd: Cmd) -> None:
        with self.lock:
            w = int(self.a["cmd_write"][0])
            self.a["cmd_ring"][w % CMD_SLOTS] = float(cmd)
            self.a["cmd_write"][0] = w + 1

    def policy_alive(self, t: float | None = None) -> None:
        self.a["policy_alive_t"][0] = time.monotonic() if t is None else t  # one aligned store: atomic

    def policy_lost(self) -> None:
        self.a["policy_alive_t"][0] = -1e9

    # -- servo side (never blocks)

    def poll(self, last_seq: int) -> tuple[list[Cmd], tuple[int, float, np.ndarray, np.ndarray] | None, bool]:
        """(new commands, new chunk or None, whether the lock was free). Commands beyond the ring's size
        since the last poll are lost; STOP is then assumed (the safe reading)."""
        if not self.lock.acquire(False):
            return [], None, False
        try:
            w = int(self.a["cmd_write"][0])
            cmds: list[Cmd] = []
            if w - self._cmd_read > CMD_SLOTS:
                cmds.append(Cmd.STOP)
                self._cmd_read = w - CMD_SLOTS
            while self._cmd_read < w:
                cmds.append(Cmd(int(self.a["cmd_ring"][self._cmd_read % CMD_SLOTS])))
                self._cmd_read += 1
            seq = int(self.a["chunk_seq"][0])
            chunk = None
            if seq != last_seq and seq > 0:
                n = int(self.a["chunk_n"][0])
                chunk = (
                    seq,
                    float(self.a["chunk_t_obs"][0]),
                    self.a["chunk_t"][:n].copy(),
                    self.a["chunk_wp"][: n * WAYPOINT_DIM].reshape(n, WAYPOINT_DIM).copy(),
                )
            return cmds, chunk, True
        finally:
            self.lock.release()

    def policy_alive_t(self) -> float:
        return float(self.a["policy_alive_t"][0])

    def publish(self, **values: Any) -> None:
        seq = self.a["status_seq"]
        seq[0] += 1  # odd: writing
        for k, v in values.items():
            self.a[k][:] = v
        seq[0] += 1

    # -- readers

    def status(self, timeout: float = 0.05) -> Status:
        deadline = time.monotonic() + timeout
        while True:
            s0 = self.a["status_seq"][0]
            snap = {k: self.a[k].copy() for k in _STATUS_FIELDS}
            if s0 == self.a["status_seq"][0] and int(s0) % 2 == 0:
                break
            if time.monotonic() > deadline:
                break  # the writer died mid-write: a torn snapshot is better than none
        s = {k: (v if len(v) > 1 else float(v[0])) for k, v in snap.items()}
        return Status(
            mode=Mode(int(s["mode"])),
            reason=Reason(int(s["reason"])),
            t=s["t"],
            tcp_pose=s["tcp_pose"],
            tcp_speed=s["tcp_speed"],
            q=s["q"],
            qd=s["qd"],
            gripper=s["gripper"],
            eef_quat=snap["eef_quat"],
            gripper_joints=snap["gripper_joints"][: int(s["n_gripper_joints"])],
            sim_qpos=snap["sim_qpos"][: int(s["sim_nq"])],
            cmd_pose=s["cmd_pose"],
            safety_mode=int(s["safety_mode"]),
            robot_mode=int(s["robot_mode"]),
            protective_stop=bool(s["protective_stop"]),
            emergency_stop=bool(s["emergency_stop"]),
            program_running=bool(s["program_running"]),
            connected=bool(s["connected"]),
            ticks=int(s["ticks"]),
            overruns=int(s["overruns"]),
            period=s["period"],
            period_max=s["period_max"],
            command_age=s["command_age"],
            stop_t=s["stop_t"],
            resume_t=s["resume_t"],
            resume_pending=bool(s["resume_pending"]),
            rejected=int(s["rejected"]),
            limited=int(s["limited"]),
            chunk_used=int(s["chunk_used"]),
            policy_alive_age=time.monotonic() - self.policy_alive_t(),
            started=bool(s["started"]),
            exited=bool(s["exited"]),
        )


_STATUS_FIELDS = [f for f in Status.__dataclass_fields__ if f != "policy_alive_age"] + [
    "n_gripper_joints",
    "sim_nq",
]
