"""A FAKE Robotiq Gripper URCap socket (no gripper here): the same ASCII protocol on a real loopback TCP
socket. `SET VAR v [VAR v ...]` -> `ack`; `GET VAR` -> `VAR v`; the fingers move toward the requested
position at the requested speed in a thread; activation takes a few polls (STA 0 -> 1 -> 3)."""

from __future__ import annotations

import socket
import threading

WRITABLE = {"ACT", "GTO", "POS", "SPE", "FOR", "ATR", "ADR"}


class FakeRobotiq:
    def __init__(self, counts_per_step: int = 8):
        self.vars = {"ACT": 0, "GTO": 0, "STA": 0, "OBJ": 0, "FLT": 0, "POS": 0, "PRE": 0, "SPE": 0, "FOR": 0}
        self.lines: list[str] = []  # every line received, in order
        self.counts_per_step = counts_per_step
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True),
                         threading.Thread(target=self._fingers, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()

    def sets(self, var: str) -> list[int]:
        """The values of `var` in every SET received, in order."""
        out = []
        for line in self.lines:
            words = line.split()
            if words and words[0] == "SET":
                out += [int(v) for k, v in zip(words[1::2], words[2::2], strict=True) if k == var]
        return out

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for raw in f:
                line = raw.decode("ascii").strip()
                self.lines.append(line)
                conn.sendall((self._answer(line) + "\n").encode("ascii"))

    def _answer(self, line: str) -> str:
        words = line.split()
        with self._lock:
            if len(words) == 2 and words[0] == "GET" and words[1] in self.vars:
                if words[1] == "STA" and self.vars["ACT"] and self.vars["STA"] < 3:
                    self.vars["STA"] += 1 if self.vars["STA"] == 0 else 2  # activating, then active
                return f"{words[1]} {self.vars[words[1]]}"
            pairs = list(zip(words[1::2], words[2::2], strict=False))
            if (
                words
                and words[0] == "SET"
                and len(words) % 2 == 1
                and pairs
                and all(k in WRITABLE for k, _ in pairs)
            ):
                if not all(v.isdigit() and 0 <= int(v) <= 255 for _, v in pairs):
                    return "?"
                for k, v in pairs:
                    self.vars["PRE" if k == "POS" else k] = int(v)
                return "ack"
            return "?"

    def _fingers(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                v = self.vars
                if v["STA"] == 3 and v["GTO"]:
                    d = v["PRE"] - v["POS"]
                    v["POS"] += max(-self.counts_per_step, min(self.counts_per_step, d))
                    v["OBJ"] = 3 if v["POS"] == v["PRE"] else 0

    def close(self) -> None:
        self._stop.set()
        self.server.close()
