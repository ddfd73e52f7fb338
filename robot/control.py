"""The robot node's control socket (stop, resume, status, event) and the policy-liveness watcher.

Control: a ZeroMQ ROUTER on the robot node; requests and replies are one msgpack map each (plain values
only, no extension types, size-capped; nothing is ever unpickled). The transport's protocol has a fixed
set of policy request kinds, so this small socket has its own four ops:

    {"op": "status"}                              -> {"ok": true, "status": {...}}
    {"op": "stop"}                                -> servoStop now (latched)
    {"op": "resume"}                              -> follow fresh actions again
    {"op": "event", "kind": "knobs", "data": {}}  -> recorded in the current episode with its timestamp

Like the policy socket it binds loopback only unless told otherwise: whoever reaches it can stop or
resume the arm.

Liveness: `PolicyLiveness` pings the policy node with the transport's heartbeat request on its own DEALER
socket every `interval` and stamps the shared block when a pong arrives (with the ping's send time). A
socket monitor sees the TCP connection drop the moment a killed node's kernel closes it, and marks the
policy lost at once; the stamp's age covers hangs and network partitions.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from vla_steer.wire import ProtocolError, decode, encode, is_loopback

log = logging.getLogger(__name__)

DEFAULT_CONTROL = "tcp://127.0.0.1:5570"
MAX_CONTROL_BYTES = 64 * 1024
OPS = ("status", "stop", "resume", "event")


class ControlError(RuntimeError):
    """The robot node refused a control request, or did not answer."""


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    if len(data) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message of {len(data)} bytes; at most {MAX_CONTROL_BYTES}")
    obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(obj, dict):
        raise ValueError(f"a control message is a map, got {type(obj).__name__}")
    return obj


class ControlServer:
    """Serves `handler(request: dict) -> dict` on a thread. Binds at construction."""

    def __init__(
        self, handler: Callable[[dict], dict], address: str = DEFAULT_CONTROL, *, allow_insecure=False
    ):
        if not (is_loopback(address) or allow_insecure):
            raise ValueError(
                f"refusing to bind the robot control socket on {address!r}: anyone reaching it can move the "
                "arm. Bind a loopback address (default) and tunnel, or pass allow_insecure=True."
            )
        self.handler = handler
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="robot-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            frames = self._sock.recv_multipart()
            envelope, body = frames[:-1], frames[-1]
            rid = None
            try:
                req = _unpack(body)
                rid = req.get("id")
                op = req.get("op")
                if op not in OPS:
                    raise ValueError(f"op must be one of {OPS}, got {op!r}")
                reply = {"ok": True, "id": rid, **self.handler(req)}
            except Exception as e:  # noqa: BLE001 - every request gets an answer naming the problem
                reply = {"ok": False, "id": rid, "error": f"{type(e).__name__}: {e}"}
            self._sock.send_multipart([*envelope, _pack(reply)])

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._sock.close(0)
        self._ctx.term()


class ControlClient:
    """Talks to a robot node's control socket. A request that times out gets a fresh socket."""

    def __init__(self, address: str = DEFAULT_CONTROL, *, timeout: float = 1.0):
        self.address = address
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0
        s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        s.connect(self.address)
        return s

    def request(self, op: str, **fields: Any) -> dict:
        with self._lock:
            rid = next(self._ids)
            self._sock.send_multipart([b"", _pack({"op": op, "id": rid, **fields})])
            deadline = time.monotonic() + self.timeout
            while (left := deadline - time.monotonic()) > 0:
                if not self._sock.poll(int(left * 1000) + 1):
                    break
                frames = self._sock.recv_multipart()
                reply = _unpack(frames[-1])
                if reply.get("id") not in (rid, None):
                    continue  # a late answer to an abandoned request
                if not reply.get("ok"):
                    raise ControlError(reply.get("error", "refused"))
                return reply
            self._sock.close(0)
            self._sock = self._connect()
        raise ControlError(f"the robot node at {self.address} did not answer {op!r} within {self.timeout} s")

    def status(self) -> dict:
        return self.request("status")["status"]

    def stop(self) -> dict:
        return self.request("stop")

    def resume(self) -> dict:
        return self.request("resume")

    def event(self, kind: str, **data: Any) -> dict:
        return self.request("event", kind=kind, data=data, t=time.time())

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class PolicyLiveness:
    """Pings the policy node and calls `alive(t)` / `lost()`; see the module docstring."""

    def __init__(
        self,
        address: str,
        alive: Callable[[float], None],
        lost: Callable[[], None],
        *,
        interval: float = 0.01,
        server_key: bytes | None = None,
        keypair: Any = None,
    ):
        self.address = address
        self.interval = interval
        self._alive, self._lost = alive, lost
        self._server_key = server_key
        self._keypair = keypair
        self._name = f"robot-liveness-{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="robot-liveness", daemon=True)
        self.last_pong = float("-inf")
        self.disconnects = 0

    def start(self) -> PolicyLiveness:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _loop(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 4  # a dead peer must not queue pings for later
        sock.reconnect_ivl = 50
        sock.reconnect_ivl_max = 200
        if self._server_key is not None:
            sock.curve_serverkey = self._server_key
            sock.curve_publickey = self._keypair.public
            sock.curve_secretkey = self._keypair.secret
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        sent: dict[int, float] = {}
        ids = itertools.count(1)
        next_ping = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    rid = next(ids)
                    try:
                        sock.send_multipart(
                            encode("heartbeat", {"client": self._name}, request_id=rid), zmq.NOBLOCK
                        )
                        sent[rid] = now
                    except zmq.Again:
                        pass
                    next_ping = now + self.interval
                    for old in [r for r, t in sent.items() if now - t > 1.0]:
                        del sent[old]
                for s, _ in poller.poll(max(1, int((next_ping - time.monotonic()) * 1000))):
                    if s is monitor:
                        event = recv_monitor_message(monitor)
                        if event["event"] == zmq.EVENT_DISCONNECTED:
                            self.disconnects += 1
                            sent.clear()
                            self._lost()
                    else:
                        frames = sock.recv_multipart(copy=False)
                        try:
                            msg = decode(frames)
                        except ProtocolError:
                            continue
                        t_sent = sent.pop(msg.request_id, None)
                        if msg.kind == "heartbeat" and t_sent is not None:
                            self.last_pong = t_sent
                            self._alive(t_sent)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()
