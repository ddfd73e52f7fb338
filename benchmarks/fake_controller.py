"""A FAKE UR controller in its own process, for the servo_loop benchmark's rtde case (no UR, no URSim here).

On a real cell the servo process talks to the controller through ur_rtde: every period it sends a servoL
and a watchdog kick and reads the robot's state; ur_rtde's waitPeriod sleeps the rest of the period. This
keeps exactly that shape: `FakeControl` / `FakeReceive` have the names of ur_rtde's RTDEControlInterface /
RTDEReceiveInterface the rtde backend uses, and exchange datagrams over loopback UDP with `controller()`,
a separate process that takes each command and answers the robot's state (the commanded pose: an ideal
arm). What the benchmark then measures is the servo loop itself (safety filter, shared memory, socket
calls, scheduling) with the policy node busy on the same machine, not a physics simulation.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

from robot.backends.base import sleep_until

CMD = struct.Struct("<B6d")  # kind, 6 values (servoL pose, servoJ q, or unused)
STATE = struct.Struct("<6d6d")  # tcp pose, q
SERVO_L, SERVO_J, STOP, KICK, HELLO, QUIT = range(6)
START_POSE = (-0.4, 0.0, 0.3, 0.0, 3.14, 0.0)
START_Q = (0.0, -1.57, 1.57, -1.57, -1.57, 0.0)


def controller(port: int, ready) -> None:
    """The controller process: answer every command with the state (pose follows servoL)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    ready.set()
    pose, q = list(START_POSE), list(START_Q)
    while True:
        data, peer = sock.recvfrom(CMD.size)
        kind, *values = CMD.unpack(data)
        if kind == QUIT:
            return
        if kind == SERVO_L:
            pose = values
        elif kind == SERVO_J:
            q = values
        sock.sendto(STATE.pack(*pose, *q), peer)


def start_controller(port: int) -> mp.Process:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=controller, args=(port, ready), name="fake-ur-controller", daemon=True)
    proc.start()
    if not ready.wait(30):
        proc.kill()
        raise RuntimeError("the fake controller did not start")
    return proc


def stop_controller(port: int, proc: mp.Process) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(CMD.pack(QUIT, *[0.0] * 6), ("127.0.0.1", port))
    proc.join(5)
    if proc.is_alive():
        proc.kill()


class _Link:
    """One UDP socket to the controller, shared by the two interfaces (as ur_rtde shares the connection)."""

    links: dict[int, _Link] = {}

    def __init__(self, port: int):
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)
        self.pose, self.q = list(START_POSE), list(START_Q)
        self.send(HELLO)

    @classmethod
    def to(cls, port: int) -> _Link:
        if port not in cls.links:
            cls.links[port] = cls(port)
        return cls.links[port]

    def send(self, kind: int, values=(0.0,) * 6) -> bool:
        self.sock.sendto(CMD.pack(kind, *values), self.addr)
        state = STATE.unpack(self.sock.recv(STATE.size))
        self.pose, self.q = list(state[:6]), list(state[6:])
        return True


class FakeControl:
    """The rtde_control.RTDEControlInterface names the rtde backend uses."""

    def __init__(self, host: str, frequency: float, *, port: int):
        self.link, self.dt = _Link.to(port), 1.0 / frequency

    def servoL(self, pose, speed, accel, t, lookahead, gain):  # noqa: N802 - ur_rtde's names
        return self.link.send(SERVO_L, pose)

    def servoJ(self, q, speed, accel, t, lookahead, gain):  # noqa: N802
        return self.link.send(SERVO_J, q)

    def servoStop(self, a=10.0):  # noqa: N802
        return self.link.send(STOP)

    def moveJ(self, q, speed, accel):  # noqa: N802
        return self.link.send(SERVO_J, q)

    def setWatchdog(self, min_frequency):  # noqa: N802
        return True

    def kickWatchdog(self):  # noqa: N802
        return self.link.send(KICK)

    def initPeriod(self):  # noqa: N802
        return time.monotonic()

    def waitPeriod(self, t_start):  # noqa: N802 - ur_rtde sleeps, then spins, to the period's end
        sleep_until(t_start + self.dt)

    def isProgramRunning(self):  # noqa: N802
        return True

    def isConnected(self):  # noqa: N802
        return True

    def reconnect(self):
        return True

    def reuploadScript(self):  # noqa: N802
        return True

    def stopScript(self):  # noqa: N802
        pass

    def disconnect(self):
        pass


class FakeReceive:
    """The rtde_receive.RTDEReceiveInterface names the rtde backend uses."""

    def __init__(self, host: str, frequency: float, *, port: int):
        self.link = _Link.to(port)

    def getActualTCPPose(self):  # noqa: N802
        return self.link.pose

    def getActualTCPSpeed(self):  # noqa: N802
        return [0.0] * 6

    def getActualQ(self):  # noqa: N802
        return self.link.q

    def getActualQd(self):  # noqa: N802
        return [0.0] * 6

    def getSafetyMode(self):  # noqa: N802
        return 1

    def getRobotMode(self):  # noqa: N802
        return 7

    def isProtectiveStopped(self):  # noqa: N802
        return False

    def isEmergencyStopped(self):  # noqa: N802
        return False

    def isConnected(self):  # noqa: N802
        return True

    def reconnect(self):
        return True

    def disconnect(self):
        pass
