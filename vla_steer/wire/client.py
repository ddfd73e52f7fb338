"""The node-side end of the wire: a `Client` for a policy node (or any `Server`), with its liveness.

A DEALER socket, not REQ: REQ wedges in its send/recv state machine after a timeout. Each request carries a
fresh id; replies with another id (late replies to abandoned requests) are dropped. Every call has a
timeout and bounded retries ("infer" none by default: it is not idempotent), and after a timeout the socket
is closed (linger 0) and recreated, so a queued stale request is never delivered to a restarted server. A
background thread sends heartbeats on its own socket, so `client.alive` turns False within `liveness`
seconds of the server dying, even while an inference is in flight, and at once when the server's TCP
connection drops (a killed process's kernel closes it).

    with Client("tcp://127.0.0.1:5555") as c:  # sim / robot node
        info = c.hello()
        chunk = c.infer(Observation("pick up the bowl", {"agentview": image}, state)).actions
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from vla_steer.wire.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    REQUEST_KINDS,
    Message,
    ProtocolError,
    decode,
    encode,
    require_finite,
)
from vla_steer.wire.messages import InferResult, KnobsRequest, Observation, ServerInfo, check_reply
from vla_steer.wire.security import Keypair, as_keypair, public_key, socket_options
from vla_steer.wire.server import DEFAULT_ADDRESS, LIVENESS_S

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.25


class RequestTimeout(TimeoutError):
    """No reply within the timeout after all retries."""


class RemoteError(RuntimeError):
    """The server answered with an "error" reply."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"[{code}] {message}" + (f" (field {field!r})" if field else ""))
        self.code = code
        self.message = message
        self.field = field


class Client:
    """Talks to a `Server`. Never blocks longer than `timeout * (retries + 1)` plus reconnects.

    Thread-safety: requests are serialized by a lock, so a client may be shared between threads, but a
    thread then waits for another's request to finish; use one client per thread for parallel requests.
    Liveness: unless `heartbeat_interval` is None, a background thread pings the server on its own socket
    and `alive` is True while a pong arrived within the last `liveness` seconds.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        liveness: float = LIVENESS_S,
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL_S,
        server_key: bytes | str | os.PathLike | Keypair | None = None,
        keypair: Keypair | str | os.PathLike | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        require_finite_actions: bool = True,
        reconnect_on_timeout: bool = True,
        name: str | None = None,
    ):
        if not (0 < timeout < float("inf")) or retries < 0:
            raise ValueError("timeout must be positive and finite, retries >= 0")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.liveness = liveness
        self.max_message_bytes = max_message_bytes
        self.require_finite_actions = require_finite_actions
        self.reconnect_on_timeout = reconnect_on_timeout
        self.name = name or f"client-{os.getpid()}-{os.urandom(4).hex()}"
        self.stale_replies = 0  # replies dropped because they answered an earlier request
        self._server_key = public_key(server_key) if server_key is not None else None
        if self._server_key is not None:
            # No keypair: an ephemeral one, which only a server allowing any key will accept.
            self._keypair = (
                as_keypair(keypair, True, "a CURVE client") if keypair else Keypair(*zmq.curve_keypair())
            )
        elif keypair is not None:
            raise ValueError("keypair needs server_key (the server's public key)")
        else:
            self._keypair = None
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._sock = self._connect()
        self._last_pong = float("-inf")
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat_interval is not None:
            self._beat = threading.Thread(
                target=self._beat_loop, args=(heartbeat_interval,), name="vla-steer-heartbeat", daemon=True
            )
            self._beat.start()

    def _connect(self, sndhwm: int | None = None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        socket_options(sock, self.max_message_bytes, self.address)
        sock.sndtimeo = int(self.timeout * 1000)  # a send can never block forever either
        if sndhwm is not None:
            sock.sndhwm = sndhwm
        if self._keypair is not None:
            sock.curve_secretkey = self._keypair.secret
            sock.curve_publickey = self._keypair.public
            sock.curve_serverkey = self._server_key
        sock.connect(self.address)
        return sock

    # -- requests

    def request(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Message:
        """Send one request and return its reply. Raises RequestTimeout, RemoteError or ProtocolError."""
        if kind not in REQUEST_KINDS:
            raise ValueError(f"{kind!r} is not a request kind; expected one of {REQUEST_KINDS}")
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            for _ in range(retries + 1):
                rid = next(self._ids)
                frames = encode(kind, payload, request_id=rid, max_bytes=self.max_message_bytes)
                reply = self._attempt(kind, frames, rid, timeout)
                if reply is not None:
                    return reply
                if self.reconnect_on_timeout:  # drop whatever is queued for the old connection
                    self._sock.close(linger=0)
                    self._sock = self._connect()
        raise RequestTimeout(
            f"no reply to {kind!r} from {self.address} within {timeout}s ({retries + 1} attempts)"
        )

    def _attempt(self, kind: str, frames: list, rid: int, timeout: float) -> Message | None:
        deadline = time.monotonic() + timeout
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return None
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(1, int(remaining * 1000))):
                return None
            raw = self._sock.recv_multipart(copy=False)
            try:
                msg = decode(raw, max_bytes=self.max_message_bytes)
            except ProtocolError as e:
                if e.request_id is not None and e.request_id != rid:
                    self.stale_replies += 1
                    continue
                raise
            if msg.request_id != rid:  # a late reply to a request we already gave up on
                self.stale_replies += 1
                log.debug("dropping stale reply %d (waiting for %d)", msg.request_id, rid)
                continue
            check_reply(msg, kind)
            if msg.kind == "error":
                p = msg.payload
                raise RemoteError(p["code"], p["message"], p.get("field"))
            return msg
        return None

    def hello(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_payload(self.request("hello", {"client": self.name}, timeout=timeout).payload)

    def infer(
        self,
        observation: Observation | Mapping[str, Any],
        *,
        steer: Mapping[str, float] | None = None,
        activations: Iterable[str] | None = None,
        setpoints: Mapping[str, float] | None = None,
        ee_pos: Iterable[float] | None = None,
        ee_time: float | None = None,
        carrying: bool | None = None,
        measured: Mapping[str, float] | None = None,
        info: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> InferResult:
        """One action chunk for `observation`. Arrays in the result are read-only views of the reply.

        `steer`: None, the node's live knobs apply; a map, this inference alone runs with exactly those
        knobs at those strengths and every other knob off (`{}`: unsteered), whatever the live knobs are,
        which it leaves untouched. Checked like a knobs request (a bad one is a `RemoteError` naming the
        knob). `result.info["steering"]` is the setting the inference ran under.

        `setpoints`: behaviour targets for this inference (axis -> value, e.g. `{"speed": 0.10}` m/s; None: the
        node's live targets, `knobs target`); the node's controller for this client's episode then sets the
        axis's knobs. It measures the behaviour on `ee_pos` (the end effector's position, m) at `ee_time`
        (when it was measured, s, on the client's clock: sim time in a simulator; without it, the policy's
        chunk duration apart) and `carrying` (whether the gripper holds something; height is measured only
        then), or takes `measured` (axis -> value) from the client. `result.info["<axis>_target"]`,
        `["<axis>_measured"]` and `["<axis>_strength"]` say what it did.

        `observation` is an `Observation` (what sim and robot nodes send; a policy node checks it with
        `Observation.from_payload`) or a plain map, for servers whose handlers take something else.

        Unlike the other requests, an inference is not retried unless `retries` says so (the client's
        `retries` does not apply): it is not idempotent (it advances the policy's state and may move a
        robot), and a slow one that timed out is still running on the server, so resending it would only
        queue the same work again behind it. A timeout raises `RequestTimeout`; whether the node is gone
        is what `alive` (the heartbeats) tells.
        """
        if isinstance(observation, Observation):
            observation = observation.to_payload()
        payload: dict[str, Any] = {"observation": observation}
        optional = {
            "steer": (steer, _floats),
            "activations": (activations, list),
            "setpoints": (setpoints, _floats),
            "ee_pos": (ee_pos, lambda p: [float(x) for x in p]),
            "ee_time": (ee_time, float),
            "carrying": (carrying, bool),
            "measured": (measured, _floats),
        }
        payload |= {name: wire(value) for name, (value, wire) in optional.items() if value is not None}
        if info:
            payload["info"] = dict(info)
        result = InferResult.from_payload(
            self.request("infer", payload, timeout=timeout, retries=retries).payload
        )
        if self.require_finite_actions:
            require_finite(result.actions, "actions")
        return result

    def reset(
        self, *, episode: str | None = None, seed: int | None = None, info: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        if episode is not None:
            payload["episode"] = episode
        if seed is not None:
            payload["seed"] = int(seed)
        if info:
            payload["info"] = dict(info)
        return self.request("reset", payload).payload

    def knobs(self, req: KnobsRequest) -> dict[str, dict[str, Any]]:
        """Run a knobs op; returns concept -> state as the server reports it."""
        return self.request("knobs", req.to_payload()).payload["knobs"]

    def list_knobs(self) -> dict[str, dict[str, Any]]:
        return self.knobs(KnobsRequest("list"))

    def get_knobs(self, concepts: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        return self.knobs(KnobsRequest("get", None if concepts is None else tuple(concepts)))

    def set_knobs(self, strengths: Mapping[str, float]) -> dict[str, dict[str, Any]]:
        return self.knobs(KnobsRequest("set", strengths=dict(strengths)))

    def enable(self, concepts: Iterable[str]) -> dict[str, dict[str, Any]]:
        return self.knobs(KnobsRequest("enable", tuple(concepts)))

    def disable(self, concepts: Iterable[str]) -> dict[str, dict[str, Any]]:
        return self.knobs(KnobsRequest("disable", tuple(concepts)))

    def knobs_off(self) -> dict[str, dict[str, Any]]:
        """Every knob off and every setpoint dropped."""
        return self.knobs(KnobsRequest("off"))

    def set_targets(self, targets: Mapping[str, float]) -> dict[str, float]:
        """Live behaviour setpoints (axis -> value, e.g. `{"speed": 0.10}`); returns every live target."""
        return self._targets(KnobsRequest("target", targets=dict(targets)))

    def clear_targets(self, axes: Iterable[str]) -> dict[str, float]:
        """Drop the named axes' setpoints (their knobs go back to the live strengths); returns the rest."""
        return self._targets(KnobsRequest("untarget", axes=tuple(axes)))

    def _targets(self, req: KnobsRequest) -> dict[str, float]:
        return dict(self.request("knobs", req.to_payload()).payload.get("info", {}).get("targets", {}))

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        """Run `op` on a node's control socket (a `Server` whose handler has `control(op, args)`).

        Retried like the other requests (the client's `retries`), so ops should be safe to repeat; build
        the client with `retries=0` for one that is not.
        """
        return self.request("control", {"op": op, "args": args}).payload

    # -- liveness

    def ping(self, timeout: float | None = None) -> float | None:
        """Round-trip time of one heartbeat on the request socket, or None if none came back in time."""
        t0 = time.perf_counter()
        try:
            self.request("heartbeat", {"client": self.name}, timeout=timeout or self.liveness, retries=0)
        except RequestTimeout:
            return None
        return time.perf_counter() - t0

    @property
    def last_pong(self) -> float:
        """`time.monotonic()` of the last heartbeat reply; -inf before the first and after a disconnect."""
        return self._last_pong

    @property
    def alive(self) -> bool:
        """Whether the server answered a heartbeat within the last `liveness` seconds."""
        if self._beat is None:
            return self.ping() is not None
        return time.monotonic() - self._last_pong <= self.liveness

    def wait_alive(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the server to be alive."""
        deadline = time.monotonic() + timeout
        while not self.alive:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _beat_loop(self, interval: float) -> None:
        # Own socket (zmq sockets are not thread-safe); a tiny send queue so a dead server does not pile
        # up heartbeats that would all be answered at once when it comes back.
        sock = self._connect(sndhwm=2)
        # A dropped connection ends liveness at once rather than `liveness` seconds later.
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            for rid in itertools.count(1):
                if self._stop.is_set():
                    return
                with contextlib.suppress(zmq.Again):  # queue full while the server is away
                    sock.send_multipart(
                        encode("heartbeat", {"client": self.name}, request_id=rid), zmq.NOBLOCK
                    )
                deadline = time.monotonic() + interval
                while (remaining := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    ready = dict(poller.poll(max(1, int(min(remaining, 0.05) * 1000))))
                    if monitor in ready and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                        self._last_pong = float("-inf")
                    if sock in ready:
                        try:
                            msg = decode(sock.recv_multipart(copy=False), max_bytes=self.max_message_bytes)
                        except ProtocolError:
                            continue
                        if msg.kind == "heartbeat":
                            self._last_pong = time.monotonic()
        except zmq.ContextTerminated:
            pass
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    # -- lifecycle

    def close(self) -> None:
        """Close sockets and stop the heartbeat thread. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(2.0)
        with self._lock:
            self._closed = True
            self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _floats(values: Mapping[str, Any]) -> dict[str, Any]:
    """numpy scalars as floats; anything else goes as is, for the node to refuse."""
    return {
        k: float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
        for k, v in values.items()
    }
