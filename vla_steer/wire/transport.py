"""ZeroMQ transport for the protocol in `vla_steer.wire.protocol`: a policy `Server`, a `Client`, telemetry.

Torch-free (the LIBERO node imports it from its own environment): standard library, numpy, pyzmq, msgpack.

Server
    One ROUTER socket serves any number of DEALER clients; every reply goes back to its sender's routing
    id. One thread owns the sockets and answers control kinds (hello, knobs, heartbeat) itself; "infer" and
    "reset" (which touch the policy's state) go to a worker thread, so a slow inference never delays a knob
    change or a heartbeat. Every malformed request gets an "error" reply naming the problem, and the
    server keeps serving. Optional PUB socket: one telemetry record per request.

Client
    A DEALER socket, not REQ: REQ wedges in its send/recv state machine after a timeout. Each request
    carries a fresh id; replies with another id (late replies to abandoned requests) are dropped. Every
    call has a timeout and bounded retries ("infer" none by default: it is not idempotent), and after a
    timeout the socket is closed (linger 0) and recreated, so a queued stale request is never delivered
    to a restarted server. A background thread sends heartbeats on its own socket, so `client.alive`
    turns False within `liveness` seconds of the server dying, even while an inference is in flight, and
    at once when the server's TCP connection drops (a killed process's kernel closes it).

Security
    Binding anything but loopback/ipc/inproc requires CURVE keys (server keypair + allow-list of client
    public keys, checked by a ZAP authenticator) unless `allow_insecure=True`: whoever reaches this socket
    can drive a robot.

    with Server(policy_handler, "tcp://127.0.0.1:5555", telemetry_address="tcp://127.0.0.1:5556"):
        ...                                   # policy node: serve until closed
    with Client("tcp://127.0.0.1:5555") as c:  # sim / robot node
        info = c.hello()
        chunk = c.infer({"agentview": image, "state": state, "prompt": "pick up the bowl"}).actions
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import queue
import socket as pysocket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from vla_steer.wire.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    REQUEST_KINDS,
    Code,
    InferResult,
    KnobsRequest,
    Message,
    ProtocolError,
    ServerInfo,
    TelemetryRecord,
    check_reply,
    check_request,
    decode,
    encode,
    error_payload,
    require_finite,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
LIVENESS_S = 1.0  # a peer silent for this long is considered gone
HEARTBEAT_INTERVAL_S = 0.25
TELEMETRY_TOPIC = b"vla-steer/telemetry"
HANDLED_KINDS = ("hello", "infer", "reset", "knobs")  # heartbeat is answered by the server itself
_ZMQ_HEARTBEAT_MS = 250  # ZMTP-level pings: dead TCP peers are dropped after _ZMQ_HEARTBEAT_TIMEOUT_MS
_ZMQ_HEARTBEAT_TIMEOUT_MS = 1000
_MAX_CLIENT_NAME = 256  # characters of a heartbeat's client name the server keeps


class InsecureBindError(ValueError):
    """Refused to bind a non-loopback address without CURVE keys."""


class RequestTimeout(TimeoutError):
    """No reply within the timeout after all retries."""


class RemoteError(RuntimeError):
    """The server answered with an "error" reply."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"[{code}] {message}" + (f" (field {field!r})" if field else ""))
        self.code = code
        self.message = message
        self.field = field


# ----------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair in Z85 (40 ASCII bytes each). `secret` is None for a peer's public key."""

    public: bytes
    secret: bytes | None = None


def generate_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `<name>.key` (public, share it) and `<name>.key_secret` (mode 0600) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(path: str | os.PathLike) -> Keypair:
    """Load a key file written by `generate_keypair` (a `.key_secret` file gives both halves)."""
    public, secret = zmq.auth.load_certificate(path)
    return Keypair(public, secret)


def _as_keypair(key: Keypair | str | os.PathLike, need_secret: bool, what: str) -> Keypair:
    kp = key if isinstance(key, Keypair) else load_keypair(key)
    if need_secret and not kp.secret:
        raise ValueError(f"{what} needs a secret key; pass the .key_secret file or a Keypair with secret")
    return kp


def _public_key(key: bytes | str | os.PathLike | Keypair) -> bytes:
    """Accept a Z85 key (bytes/str), a raw 32-byte key, a Keypair or a key file path."""
    if isinstance(key, Keypair):
        return key.public
    if isinstance(key, bytes) and len(key) == 32:
        return zmq.utils.z85.encode(key)
    if isinstance(key, bytes) and len(key) == 40:
        return key
    if isinstance(key, str) and len(key) == 40 and not os.path.exists(key):
        return key.encode("ascii")
    return load_keypair(key).public


def _allow_list(allowed: Any) -> frozenset[bytes]:
    if isinstance(allowed, (str, os.PathLike)) and Path(allowed).is_dir():
        return frozenset(zmq.auth.load_certificates(allowed))
    if isinstance(allowed, (str, bytes, os.PathLike, Keypair)):
        return frozenset({_public_key(allowed)})
    return frozenset(_public_key(k) for k in allowed)


class _AllowList:
    """ZAP credentials provider: a client is served only if its public key is on the list."""

    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            log.warning("refused CURVE client with unknown public key %s", key.decode("ascii", "replace"))
        return ok


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host (127.0.0.0/8, ::1, localhost)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, host names
        return False


def _is_ipv6(address: str) -> bool:
    """True for a tcp:// address whose host is an IPv6 literal ("tcp://[::1]:5555")."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        return True
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _check_bind(address: str, secure: bool, allow_insecure: bool) -> None:
    if secure or allow_insecure or is_loopback(address):
        return
    raise InsecureBindError(
        f"refusing to bind {address!r} without CURVE keys: anyone who can reach it could drive the policy "
        "(and the robot). Pass keypair=... and allowed_clients=... (see vla_steer.wire.transport.generate_keypair), "
        "bind a loopback address, or pass allow_insecure=True to accept the risk."
    )


def _base_options(sock: zmq.Socket, max_bytes: int, address: str | None = None) -> None:
    sock.linger = 0
    if address is not None and _is_ipv6(address):
        sock.ipv6 = True  # zmq sockets are IPv4-only unless told otherwise ("No such device" on bind)
    # Hard cap per frame (peers beyond it are disconnected); the soft cap in decode answers with an error.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + 65536)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMQ_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMQ_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, _ZMQ_HEARTBEAT_TIMEOUT_MS)


# --------------------------------------------------------------------------------------------- server


@dataclass
class Request:
    """What a handler receives. Arrays in `payload` are read-only views of the received frames."""

    kind: str
    payload: dict[str, Any]
    request_id: int
    timestamp: float
    client: bytes  # the sender's routing id

    @property
    def knobs(self) -> KnobsRequest:
        return KnobsRequest.from_payload(self.payload)


@dataclass
class Reply:
    """A handler result with telemetry attached (published on the PUB socket, not sent to the client)."""

    payload: Any = None  # a mapping, or a value with to_payload() (ServerInfo, InferResult)
    telemetry: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[[Request], Any]


@dataclass
class _Job:
    envelope: list[bytes]
    request: Request
    t_recv: float
    decode_s: float


class Server:
    """Serves a policy over ZeroMQ. Construct (binds), then `start()` or use as a context manager.

    `handler` is a mapping kind -> callable, or an object with methods `hello`, `infer`, `reset`, `knobs`
    (missing ones answer "unsupported"). A handler takes a `Request` and returns a mapping, a value with
    `to_payload()` (`ServerInfo`, `InferResult`), a `Reply` (to add telemetry), or None; it may raise
    `ProtocolError(code, message, field)` to answer a specific error. Infer replies keep only the
    activations the request asked for. Handlers in `worker_kinds` run one at a time in a worker thread;
    the others run on the socket thread, concurrently with it, and must be quick and thread-safe with
    respect to the worker (the steering knobs are built for that). Reply arrays are sent zero-copy: return
    arrays you will not mutate afterwards. Requests over `max_message_bytes` get a "too_large" error; a
    single frame over twice that is cut off by zmq (MAXMSGSIZE) and its sender disconnected unanswered.
    """

    def __init__(
        self,
        handler: Mapping[str, Handler] | object,
        address: str = DEFAULT_ADDRESS,
        *,
        telemetry_address: str | None = None,
        keypair: Keypair | str | os.PathLike | None = None,
        allowed_clients: Iterable[bytes | str | os.PathLike | Keypair] | str | os.PathLike | None = None,
        allow_insecure: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        require_finite_observations: bool = True,
        worker_kinds: Iterable[str] = ("infer", "reset"),
        max_pending: int = 32,
        liveness: float = LIVENESS_S,
        telemetry_heartbeats: bool = False,
        forget_clients_after: float | None = None,
        max_clients: int = 4096,
    ):
        self._handlers = _resolve_handlers(handler)
        if not self._handlers:
            raise ValueError(f"handler {handler!r} has none of the methods {HANDLED_KINDS}")
        self.max_message_bytes = max_message_bytes
        self.require_finite_observations = require_finite_observations
        self.worker_kinds = frozenset(worker_kinds)
        self.max_pending = max_pending
        self.liveness = liveness
        self.telemetry_heartbeats = telemetry_heartbeats
        # Any peer can add names to the heartbeat table, so it is bounded in age and in size.
        self.forget_clients_after = 10 * liveness if forget_clients_after is None else forget_clients_after
        self.max_clients = max_clients
        secure = keypair is not None
        if secure and allowed_clients is None:
            raise ValueError(
                "a CURVE server needs allowed_clients: a directory of .key files or a list of keys"
            )
        if allowed_clients is not None and not secure:
            raise ValueError("allowed_clients needs keypair= (the server's secret key)")
        for addr in (address, telemetry_address):
            if addr is not None:
                _check_bind(addr, secure, allow_insecure)

        # Own context: ZAP authentication is per context, and closing must not touch anyone else's sockets.
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._pub: zmq.Socket | None = None
        try:
            kp = _as_keypair(keypair, True, "the server") if secure else None
            if kp is not None:
                self._auth = ThreadAuthenticator(self._ctx, log=log.getChild("auth"))
                self._auth.start()
                self._auth.configure_curve_callback("*", _AllowList(_allow_list(allowed_clients)))
            self._router = self._socket(zmq.ROUTER, kp, address)
            self._router.bind(address)
            self.address: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.telemetry_address: str | None = None
            if telemetry_address is not None:
                self._pub = self._socket(zmq.PUB, kp, telemetry_address)
                self._pub.bind(telemetry_address)
                self.telemetry_address = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._teardown()
            raise
        self.public_key = kp.public if kp else None
        # Workers hand replies back through a queue + a socketpair the socket thread polls: workers own
        # no zmq socket, so a handler stuck at shutdown cannot block context termination.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0  # queued + running worker jobs; touched by the socket thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        # client name -> monotonic time of its last heartbeat, oldest first (see _heard_from)
        self._clients: dict[str, float] = {}
        self._clients_lock = threading.Lock()

    def _socket(self, kind: int, kp: Keypair | None, address: str) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        _base_options(sock, self.max_message_bytes, address)
        if kp is not None:
            sock.curve_secretkey = kp.secret
            sock.curve_publickey = kp.public
            sock.curve_server = True
        return sock

    # -- lifecycle

    def start(self) -> Server:
        if self._closed:
            raise RuntimeError("server is closed")
        if self._thread is None:
            self._worker = threading.Thread(target=self._work, name="vla-steer-infer", daemon=True)
            self._thread = threading.Thread(target=self._loop, name="vla-steer-server", daemon=True)
            self._worker.start()
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until `close()` or Ctrl-C."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving and release the address. Idempotent. Waits up to `timeout` for a running handler."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)  # the socket thread closes its sockets on the way out
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("a handler is still running after close(); abandoning it")
        self._teardown()
        self._wake_r.close()
        self._wake_w.close()

    def _teardown(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            # Its sockets are not ours to touch from this thread, and term() would block on them.
            log.warning("server socket thread did not stop (a slow control handler?); leaving it running")
            return
        for sock in (getattr(self, "_router", None), self._pub):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- liveness of clients

    def clients(self) -> dict[str, float]:
        """Seconds since each client's last heartbeat, by client name.

        Clients silent for more than `forget_clients_after` seconds are forgotten, and beyond `max_clients`
        names the longest-silent ones are.
        """
        now = time.monotonic()
        with self._clients_lock:
            self._forget_clients(now)
            return {name: now - t for name, t in self._clients.items()}

    def _heard_from(self, name: str) -> None:
        now = time.monotonic()
        with self._clients_lock:
            self._clients.pop(name, None)  # re-insert, so the dict stays ordered by last heartbeat
            self._clients[name] = now
            self._forget_clients(now)

    def _forget_clients(self, now: float) -> None:
        """Drop the oldest entries while too old or too many (caller holds the lock)."""
        while self._clients:
            oldest = next(iter(self._clients))
            if (
                len(self._clients) <= self.max_clients
                and now - self._clients[oldest] <= self.forget_clients_after
            ):
                return
            del self._clients[oldest]

    def live_clients(self) -> list[str]:
        """Clients heard from within the liveness window (clients send heartbeats every 0.25 s)."""
        return sorted(name for name, age in self.clients().items() if age <= self.liveness)

    # -- socket thread

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe means the loop is waking up anyway
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                poller.poll(500)
                self._drain_outbox()
                for _ in range(64):  # bounded, so worker replies are not starved by a flood
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._handle(frames)
                    except Exception:  # a bug here must not take the server down
                        log.exception("unexpected error handling a request")
        except zmq.ContextTerminated:
            pass
        finally:
            self._router.close(linger=0)
            if self._pub is not None:
                self._pub.close(linger=0)

    def _drain_outbox(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "reply":
                self._pending -= 1
                self._router.send_multipart([*item[1], *item[2]], copy=False)
            else:
                self._publish(item[1])

    def _publish(self, frames: list) -> None:
        if self._pub is not None:
            self._pub.send_multipart([TELEMETRY_TOPIC, *frames], copy=False)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        t_recv = time.perf_counter()
        # DEALER peers send [id, header, ...]; REQ peers add an empty delimiter, which we echo back.
        n_env = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1
        envelope = [f.bytes for f in frames[:n_env]]
        client = envelope[0]
        msg: Message | None = None
        try:
            msg = decode(frames[n_env:], max_bytes=self.max_message_bytes)
            check_request(msg)
            if msg.kind == "infer" and self.require_finite_observations:
                require_finite(msg.payload["observation"], "observation")
        except ProtocolError as e:
            # Address the error to the request when its id could be read (0 when not even that).
            rid = msg.request_id if msg is not None else e.request_id or 0
            kind = msg.kind if msg is not None else e.kind or "?"
            self._send_error(envelope, rid, e.code, e.message, e.field)
            self._emit(kind, rid, client, e.code, {"decode": time.perf_counter() - t_recv})
            return
        decode_s = time.perf_counter() - t_recv
        req = Request(msg.kind, msg.payload, msg.request_id, msg.timestamp, client)
        if msg.kind == "heartbeat":
            # (names are truncated: the table holds up to max_clients of them)
            self._heard_from((msg.payload.get("client") or client.hex())[:_MAX_CLIENT_NAME])
            t0 = time.perf_counter()
            out = encode(
                "heartbeat", {"time": time.time(), "busy": self._pending > 0}, request_id=msg.request_id
            )
            self._router.send_multipart([*envelope, *out], copy=False)
            if self.telemetry_heartbeats:
                lat = {"decode": decode_s, "encode": time.perf_counter() - t0}
                self._emit("heartbeat", msg.request_id, client, None, lat)
            return
        if msg.kind not in self._handlers:
            self._send_error(
                envelope, msg.request_id, Code.UNSUPPORTED, f"this server has no {msg.kind!r} handler", "kind"
            )
            self._emit(msg.kind, msg.request_id, client, Code.UNSUPPORTED, {"decode": decode_s})
            return
        if msg.kind in self.worker_kinds:
            if self._pending >= self.max_pending:
                self._send_error(
                    envelope, msg.request_id, Code.BUSY, f"{self._pending} requests already queued", None
                )
                self._emit(msg.kind, msg.request_id, client, Code.BUSY, {"decode": decode_s})
                return
            self._pending += 1
            self._jobs.put(_Job(envelope, req, t_recv, decode_s))
            return
        frames_out, tele = self._run(req, 0.0, decode_s)
        self._router.send_multipart([*envelope, *frames_out], copy=False)
        self._publish(tele)

    def _send_error(self, envelope: list[bytes], rid: int, code: str, message: str, fld: str | None) -> None:
        out = encode("error", error_payload(code, message, fld), request_id=rid)
        self._router.send_multipart([*envelope, *out], copy=False)

    # -- handlers (socket thread for control kinds, worker thread for worker kinds)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            queue_s = time.perf_counter() - job.t_recv - job.decode_s
            try:
                frames, tele = self._run(job.request, queue_s, job.decode_s)
            except Exception:  # _run already turns handler failures into error replies
                log.exception("unexpected error in the inference worker")
                frames = encode(
                    "error",
                    error_payload(Code.HANDLER_ERROR, "internal server error"),
                    request_id=job.request.request_id,
                )
                tele = []
            self._outbox.put(("reply", job.envelope, frames))
            if tele:
                self._outbox.put(("telemetry", tele))
            self._wake()

    def _run(self, req: Request, queue_s: float, decode_s: float) -> tuple[list, list]:
        """Call the handler and encode its reply (or the error it caused). Returns (reply, telemetry) frames."""
        t0 = time.perf_counter()
        telemetry: Mapping[str, Any] = {}
        code: str | None = None
        try:
            result = self._handlers[req.kind](req)
        except ProtocolError as e:  # the handler's own, deliberate error (e.g. an unknown concept)
            code, message, fld = e.code, e.message, e.field
        except Exception as e:
            log.exception("%s handler failed", req.kind)
            code, message, fld = (
                Code.HANDLER_ERROR,
                f"{req.kind} handler raised {type(e).__name__}: {e}",
                None,
            )
        handler_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if code is None:
            if isinstance(result, Reply):
                telemetry, result = result.telemetry, result.payload
            try:
                payload = self._reply_payload(req, result)
                frames = encode(
                    req.kind, payload, request_id=req.request_id, max_bytes=self.max_message_bytes
                )
            except (ProtocolError, TypeError) as e:  # the handler's bug, not the client's
                log.error("%s handler returned an invalid reply: %s", req.kind, e)
                code, message, fld = (
                    Code.HANDLER_ERROR,
                    f"{req.kind} handler returned an invalid reply: {e}",
                    None,
                )
        if code is not None:
            frames = encode("error", error_payload(code, message, fld), request_id=req.request_id)
        lat = {"decode": decode_s, "queue": queue_s, "handler": handler_s, "encode": time.perf_counter() - t1}
        return frames, self._record(req.kind, req.request_id, req.client, code, lat, telemetry)

    @staticmethod
    def _reply_payload(req: Request, result: Any) -> dict[str, Any]:
        payload = _to_payload(result)
        if req.kind == "infer":  # bounded: only the activations that were asked for cross the wire
            wanted = req.payload.get("activations") or ()
            acts = payload.pop("activations", None) or {}
            if wanted:
                payload["activations"] = {k: acts[k] for k in wanted if k in acts}
        check_reply(Message(req.kind, payload), req.kind)
        return payload

    def _record(
        self,
        kind: str,
        rid: int,
        client: bytes,
        code: str | None,
        lat_s: Mapping[str, float],
        telemetry: Mapping[str, Any] | None = None,
    ) -> list:
        """Encode one telemetry record (empty when there is no PUB socket). `lat_s` is in seconds."""
        if self._pub is None:
            return []
        ms = {k: lat_s.get(k, 0.0) * 1e3 for k in ("decode", "queue", "handler", "encode")}
        ms["total"] = sum(ms.values())
        rec = TelemetryRecord(
            kind, rid, client.hex(), code is None, code, ms, dict(telemetry or {}), time.time()
        )
        try:
            return encode("telemetry", rec.to_payload(), max_bytes=self.max_message_bytes)
        except ProtocolError as e:  # unencodable handler telemetry must not cost the reply
            log.warning("dropping telemetry for %s %d: %s", kind, rid, e)
            return []

    def _emit(self, kind: str, rid: int, client: bytes, code: str | None, lat_s: Mapping[str, float]) -> None:
        self._publish(self._record(kind, rid, client, code, lat_s))


def _resolve_handlers(handler: Any) -> dict[str, Handler]:
    if isinstance(handler, Mapping):
        unknown = sorted(set(handler) - set(HANDLED_KINDS))
        if unknown:
            raise ValueError(f"no such handler kinds {unknown}; handlers exist for {HANDLED_KINDS}")
        return dict(handler)
    return {k: getattr(handler, k) for k in HANDLED_KINDS if callable(getattr(handler, k, None))}


def _to_payload(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if hasattr(result, "to_payload"):
        result = result.to_payload()
    if not isinstance(result, Mapping):
        raise TypeError(f"handler returned a {type(result).__name__}, expected a mapping")
    return dict(result)


# --------------------------------------------------------------------------------------------- client


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
        self._server_key = _public_key(server_key) if server_key is not None else None
        if self._server_key is not None:
            # No keypair: an ephemeral one, which only a server allowing any key will accept.
            self._keypair = (
                _as_keypair(keypair, True, "a CURVE client") if keypair else Keypair(*zmq.curve_keypair())
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
        _base_options(sock, self.max_message_bytes, self.address)
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
        observation: Mapping[str, Any],
        *,
        activations: Iterable[str] | None = None,
        info: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> InferResult:
        """One action chunk for `observation`. Arrays in the result are read-only views of the reply.

        Unlike the other requests, an inference is not retried unless `retries` says so (the client's
        `retries` does not apply): it is not idempotent (it advances the policy's state and may move a
        robot), and a slow one that timed out is still running on the server, so resending it would only
        queue the same work again behind it. A timeout raises `RequestTimeout`; whether the node is gone
        is what `alive` (the heartbeats) tells.
        """
        payload: dict[str, Any] = {"observation": observation}
        if activations is not None:
            payload["activations"] = list(activations)
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
        return self.knobs(KnobsRequest("off"))

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


# ------------------------------------------------------------------------------------------ telemetry


class TelemetrySubscriber:
    """Receives the server's per-request `TelemetryRecord`s. Use from one thread.

    PUB/SUB drops messages published before the subscription reaches the server (a few ms after
    connecting), and whenever this subscriber falls behind by more than the socket's queue.
    """

    def __init__(
        self,
        address: str,
        *,
        server_key: bytes | str | os.PathLike | Keypair | None = None,
        keypair: Keypair | str | os.PathLike | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        _base_options(self._sock, max_message_bytes, address)
        if server_key is not None:
            kp = (
                _as_keypair(keypair, True, "a CURVE subscriber") if keypair else Keypair(*zmq.curve_keypair())
            )
            self._sock.curve_secretkey = kp.secret
            self._sock.curve_publickey = kp.public
            self._sock.curve_serverkey = _public_key(server_key)
        self._sock.setsockopt(zmq.SUBSCRIBE, TELEMETRY_TOPIC)
        self._sock.connect(address)

    def recv(self, timeout: float | None = 1.0) -> TelemetryRecord | None:
        """The next record, or None after `timeout` seconds (None: wait forever). Skips malformed ones."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if remaining is None else int(remaining * 1000)):
                return None
            frames = self._sock.recv_multipart(copy=False)
            try:
                return TelemetryRecord.from_message(decode(frames[1:], max_bytes=self.max_message_bytes))
            except ProtocolError as e:
                log.warning("dropping malformed telemetry: %s", e)
                if remaining == 0.0:
                    return None

    def drain(self) -> list[TelemetryRecord]:
        """All records already received, without waiting."""
        out = []
        while (rec := self.recv(timeout=0)) is not None:
            out.append(rec)
        return out

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> TelemetrySubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEFAULT_ADDRESS",
    "HEARTBEAT_INTERVAL_S",
    "LIVENESS_S",
    "TELEMETRY_TOPIC",
    "Client",
    "Handler",
    "InsecureBindError",
    "Keypair",
    "RemoteError",
    "Reply",
    "Request",
    "RequestTimeout",
    "Server",
    "TelemetrySubscriber",
    "generate_keypair",
    "is_loopback",
    "load_keypair",
]
