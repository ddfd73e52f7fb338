"""A Robotiq 2F-85 on a UR arm, through the Robotiq Gripper URCap's socket (TCP port 63352 on the controller).

The URCap speaks ASCII lines: `SET VAR value [VAR value ...]` answered `ack`, `GET VAR` answered
`VAR value`. Variables: ACT (activate), GTO (go to the requested position), POS (actual position, 0 open
.. 255 closed; SET POS is the request, read back as PRE), SPE and FOR (speed and force, 0..255), STA
(0 reset, 1 activating, 3 active), OBJ (0 moving, 1/2 stopped on an object, 3 at the requested position),
FLT (fault code).

The servo loop calls `move(width)` every period with the width its safety filter let through (inside the
configured range, at most `limits.gripper.max_speed`); that only stores the target. A thread here sends a
new request when it changed (at most `rate_hz` times a second) and reads the actual position back, so the
500 Hz loop never waits on this socket. Speed and force are the configured ones (`gripper.force`, and the
speed of `limits.gripper.max_speed`), in the 2F-85's datasheet ranges (20..150 mm/s, 20..235 N).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger(__name__)

ROBOTIQ_PORT = 63352
STROKE = 0.085  # m, 2F-85 fully open at POS 0
SPEED_RANGE = (0.020, 0.150)  # m/s at SPE 0 and 255
FORCE_RANGE = (20.0, 235.0)  # N at FOR 0 and 255


class GripperError(RuntimeError):
    """The gripper did not answer, refused a command, or could not be activated."""


def _byte(value: float, lo: float, hi: float) -> int:
    return int(round(min(max((value - lo) / (hi - lo), 0.0), 1.0) * 255))


def width_to_pos(width: float) -> int:
    return _byte(STROKE - width, 0.0, STROKE)


def pos_to_width(pos: int) -> float:
    return STROKE * (1.0 - pos / 255.0)


class RobotiqGripper:
    """`connect()` (activates the gripper), then `move(width)` from the servo loop; `width` is read back."""

    def __init__(
        self,
        host: str,
        port: int = ROBOTIQ_PORT,
        *,
        speed: float = 0.1,
        force: float = 60.0,
        rate_hz: float = 25.0,
        timeout: float = 2.0,
    ):
        self.host, self.port, self.timeout = host, port, timeout
        self.speed_byte = _byte(speed, *SPEED_RANGE)
        self.force_byte = _byte(force, *FORCE_RANGE)
        self.period = 1.0 / rate_hz
        self.width = float("nan")  # the actual opening, read back
        self.object = 0  # OBJ
        self.error: str | None = None
        self._target: float | None = None
        self._sent: int | None = None
        self._sock: socket.socket | None = None
        self._file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- protocol

    def _line(self, text: str) -> str:
        self._sock.sendall(text.encode("ascii") + b"\n")
        reply = self._file.readline()
        if not reply:
            raise GripperError(f"the gripper at {self.host}:{self.port} closed the connection")
        return reply.decode("ascii").strip()

    def set(self, **values: int) -> None:
        cmd = "SET " + " ".join(f"{k} {int(v)}" for k, v in values.items())
        reply = self._line(cmd)
        if reply != "ack":
            raise GripperError(f"the gripper refused {cmd!r}: {reply!r}")

    def get(self, var: str) -> int:
        reply = self._line(f"GET {var}")
        name, _, value = reply.partition(" ")
        if name != var or not value.strip().lstrip("-").isdigit():
            raise GripperError(f"unexpected answer to GET {var}: {reply!r}")
        return int(value)

    # -- lifecycle

    def connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._file = self._sock.makefile("rb")
        try:
            if self.get("STA") != 3:
                self.set(ACT=1)
                deadline = time.monotonic() + 5.0
                while self.get("STA") != 3:
                    if time.monotonic() > deadline:
                        raise GripperError("the gripper did not activate within 5 s (STA never 3)")
                    time.sleep(0.05)
            self.set(SPE=self.speed_byte, FOR=self.force_byte, GTO=1)
            self.width = pos_to_width(self.get("POS"))
        except BaseException:
            self.close()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="robotiq", daemon=True)
        self._thread.start()

    def move(self, width: float) -> None:
        """The servo loop's call: remember the (already filtered) target; never blocks."""
        self._target = width

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                target = self._target
                if target is not None and (pos := width_to_pos(target)) != self._sent:
                    self.set(POS=pos, SPE=self.speed_byte, FOR=self.force_byte)
                    self._sent = pos
                self.width = pos_to_width(self.get("POS"))
                self.object = self.get("OBJ")
                self.error = None
            except (OSError, GripperError) as e:
                self.error = str(e)
                log.error("gripper: %s", e)
                self._stop.wait(0.5)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
