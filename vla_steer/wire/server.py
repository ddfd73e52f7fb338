"""The policy node's side of the wire: a `Server` that answers every request, and what its handlers see.

One ROUTER socket serves any number of DEALER clients; every reply goes back to its sender's routing id. One
thread owns the sockets and answers the quick kinds (hello, knobs, control, heartbeat) itself; "infer" and
"reset" (which touch the policy's state) go to a worker thread, so a slow inference never delays a knob
change, a stop or a heartbeat. Every malformed request gets an "error" reply naming the problem, and the
server keeps serving. Optional PUB socket: one telemetry record per request (`vla_steer.wire.telemetry`).

    with Server(policy_handler, "tcp://127.0.0.1:5555", telemetry_address="tcp://127.0.0.1:5556"):
        ...                                   # policy node: serve until closed

Longer than ~400 lines on purpose: the socket thread, the worker and the reply path share the server's
state (pending count, outbox, client table) and are one piece of concurrency to read.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import socket as pysocket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from vla_steer.wire.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_ARRAYS,
    Code,
    Message,
    ProtocolError,
    decode,
    encode,
    peek_id,
    require_finite,
    too_large,
)
from vla_steer.wire.messages import KnobsRequest, TelemetryRecord, check_reply, check_request, error_payload
from vla_steer.wire.security import (
    AllowList,
    Keypair,
    as_keypair,
    check_bind,
    load_allow_list,
    socket_options,
)
from vla_steer.wire.telemetry import TELEMETRY_TOPIC

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
LIVENESS_S = 1.0  # a peer silent for this long is considered gone
MAX_PENDING = 32  # infer/reset requests a server queues by default; more are answered "busy"
HANDLED_KINDS = ("hello", "infer", "reset", "knobs", "control")  # the server answers heartbeats itself
_MAX_CLIENT_NAME = 256  # characters of a heartbeat's client name the server keeps
_MAX_FRAMES = MAX_ARRAYS + 3  # routing id, REQ delimiter, header, one frame per array


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
    future: Future | None = None  # set for requests from another front door (see `Server.submit`)


class Server:
    """Serves a policy over ZeroMQ. Construct (binds), then `start()` or use as a context manager.

    `handler` is a mapping kind -> callable, or an object with methods `hello`, `infer`, `reset`, `knobs`,
    `control` (missing ones answer "unsupported"). `control(op, args)` gets the request's op name and args
    map (a node's control socket: stop, resume, status, ...); every other handler gets a `Request`. A
    handler returns a mapping, a value with `to_payload()` (`ServerInfo`, `InferResult`), a `Reply` (to add
    telemetry), or None; it may raise `ProtocolError(code, message, field)` to answer a specific error.
    Infer replies keep only the activations the request asked for. Handlers in `worker_kinds` run one at a
    time in a worker thread; the others (control included, so a stop never queues behind an inference) run
    on the socket thread, concurrently with the worker, and must be quick and thread-safe with
    respect to the worker (the steering knobs are built for that). Reply arrays are sent zero-copy: return
    arrays you will not mutate afterwards.

    Batching: with `batch_max > 1` (default: the handler's own `batch_max` attribute, e.g. `PolicyNode`'s,
    so what its hello says is what happens; a different explicit value is refused) the worker hands
    concurrent infer requests to the handler's `infer_batch` together; a reset ends a batch, so each
    client's requests run in the order it sent them.

    Size: a request (header + every frame) over `max_message_bytes` gets a "too_large" error, and its
    frames are released as they are read (only the routing id and header are kept, to address the error).
    A single frame over `max_message_bytes` is cut off by zmq itself (MAXMSGSIZE, checked on the frame's
    length prefix, before its bytes are buffered) and its sender disconnected unanswered. What no zmq
    application can bound (libzmq 4.3): MAXMSGSIZE applies per frame, and libzmq hands a multipart message
    to the application only once all of its frames have arrived, so while one is in flight libzmq holds
    frames-so-far x `max_message_bytes` at most, per connection. Pass `keypair=`/`allowed_clients=` so only
    known peers get that far; the node's memory soak benchmark (benchmarks/node_soak.py) measures the rest.
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
        max_pending: int = MAX_PENDING,
        liveness: float = LIVENESS_S,
        telemetry_heartbeats: bool = False,
        forget_clients_after: float | None = None,
        max_clients: int = 4096,
        batch_max: int | None = None,
        batch_wait: float = 0.0,
    ):
        self._handlers = _resolve_handlers(handler)
        if not self._handlers:
            raise ValueError(f"handler {handler!r} has none of the methods {HANDLED_KINDS}")
        own = None if isinstance(handler, Mapping) else getattr(handler, "batch_max", None)
        if batch_max is None:
            batch_max = 1 if own is None else own
        elif own is not None and batch_max != own:  # the handler says what it does (e.g. in its hello)
            raise ValueError(f"batch_max={batch_max!r}, but the handler's batch_max is {own!r}: set it there")
        if not (isinstance(batch_max, int) and 1 <= batch_max <= max_pending):
            raise ValueError(f"batch_max must be an int in 1..max_pending ({max_pending}), got {batch_max!r}")
        if not 0.0 <= batch_wait <= 1.0:
            raise ValueError(f"batch_wait must be 0..1 seconds, got {batch_wait!r}")
        self.batch_max = batch_max
        self.batch_wait = batch_wait
        batched = None if isinstance(handler, Mapping) else getattr(handler, "infer_batch", None)
        self._infer_batch = batched if callable(batched) and batch_max > 1 else None
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
                check_bind(addr, secure, allow_insecure)

        # Own context: ZAP authentication is per context, and closing must not touch anyone else's sockets.
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._pub: zmq.Socket | None = None
        try:
            kp = as_keypair(keypair, True, "the server") if secure else None
            if kp is not None:
                self._auth = ThreadAuthenticator(self._ctx, log=log.getChild("auth"))
                self._auth.start()
                self._auth.configure_curve_callback("*", AllowList(load_allow_list(allowed_clients)))
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
        # (a SimpleQueue: put and get are C calls, the least GIL time on a lone request's path)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0  # queued + running worker jobs; touched by the socket thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        # client name -> monotonic time of its last heartbeat, oldest first (see _heard_from)
        self._clients: dict[str, float] = {}
        self._clients_lock = threading.Lock()
        self._local_ids = itertools.count(1)  # request ids of `submit`ted requests

    def _socket(self, kind: int, kp: Keypair | None, address: str) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        socket_options(sock, self.max_message_bytes, address)
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
        while True:  # submitted requests nobody will run now get an answer all the same
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future is not None:
                job.future.set_result(_error_message(Code.UNSUPPORTED, "the server is closed"))
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

    # -- other front doors

    def submit(self, kind: str, payload: Mapping[str, Any], client: bytes = b"local") -> Future[Message]:
        """Answer a request that arrived through another front door (openpi's websocket protocol) as one
        from the socket: the same checks, the same handler, infer and reset on the same worker (one at a
        time with the socket's), the same telemetry. Thread-safe. The future's result is the reply a client
        would decode: a `Message` of the request's kind, or an "error" one. Other kinds run in the caller's
        thread, so they must be as thread-safe as the socket thread needs them to be."""
        fut: Future[Message] = Future()
        t_recv = time.perf_counter()
        msg = Message(kind, dict(payload), next(self._local_ids), time.time())
        try:
            if self._closed:
                raise ProtocolError(Code.UNSUPPORTED, "the server is closed")
            check_request(msg)
            if kind == "infer" and self.require_finite_observations:
                require_finite(msg.payload["observation"], "observation")
            if kind not in self._handlers:
                raise ProtocolError(Code.UNSUPPORTED, f"this server has no {kind!r} handler", "kind")
        except ProtocolError as e:
            fut.set_result(_error_message(e.code, e.message, e.field))
            self._outbox.put(("telemetry", self._record(kind, msg.request_id, client, e.code, {})))
            self._wake()
            return fut
        req = Request(kind, msg.payload, msg.request_id, msg.timestamp, client)
        decode_s = time.perf_counter() - t_recv
        if kind in self.worker_kinds:
            self._jobs.put(_Job([], req, t_recv, decode_s, fut))
            return fut
        frames, tele = self._run(req, 0.0, decode_s)
        fut.set_result(self._as_message(frames))
        self._outbox.put(("telemetry", tele))
        self._wake()
        return fut

    def _as_message(self, frames: list) -> Message:
        """A reply as its client would decode it (never raises: this runs on the worker thread)."""
        try:
            return decode(frames, max_bytes=self.max_message_bytes)
        except ProtocolError as e:
            log.error("a reply could not be decoded again: %s", e)
            return _error_message(Code.HANDLER_ERROR, f"the reply could not be read back: {e.message}")

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
                        self._receive_one()
                    except zmq.Again:
                        break
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
            elif item[1]:
                self._publish(item[1])

    def _publish(self, frames: list) -> None:
        if self._pub is not None:
            self._pub.send_multipart([TELEMETRY_TOPIC, *frames], copy=False)

    def _receive_one(self) -> None:
        """Receive and answer one request; raises zmq.Again when none is waiting. Its frames are dropped on
        return (nothing here outlives the request but what a worker job holds)."""
        frames, total, count = self._receive()
        try:
            self._handle(frames, total, count, time.perf_counter())
        except Exception:  # a bug here must not take the server down
            log.exception("unexpected error handling a request")

    def _receive(self) -> tuple[list[zmq.Frame], int, int]:
        """Read one multipart request frame by frame: (frames kept, bytes after the routing id, frames).

        Once the total passes `max_message_bytes` (or the frame count the protocol allows) no further frame
        is kept and those already kept beyond the envelope and header are let go, so each is freed as soon
        as it is read; `_handle` then answers "too_large" from the envelope and header alone.
        """
        frame = self._router.recv(zmq.NOBLOCK, copy=False)
        kept, total, count = [frame], 0, 1
        while frame.more:
            frame = self._router.recv(copy=False)
            total += len(frame)
            count += 1
            if len(kept) == count - 1:  # still keeping
                if total <= self.max_message_bytes and count <= _MAX_FRAMES:
                    kept.append(frame)
                else:
                    del kept[_n_envelope(kept) + 1 :]
        return kept, total, count

    def _handle(self, frames: list[zmq.Frame], total: int, count: int, t_recv: float) -> None:
        # DEALER peers send [id, header, ...]; REQ peers add an empty delimiter, which we echo back.
        n_env = _n_envelope(frames)
        envelope = [f.bytes for f in frames[:n_env]]
        client = envelope[0]
        if total > self.max_message_bytes or count > _MAX_FRAMES:
            rid, kind = peek_id(frames[n_env]) if len(frames) > n_env else (None, None)
            err = too_large(total, self.max_message_bytes)
            if count > _MAX_FRAMES:
                err = ProtocolError(
                    Code.TOO_LARGE, f"{count} frames, over the limit of {_MAX_FRAMES}", "frames"
                )
            del frames[n_env:]  # before the reply goes out
            self._send_error(envelope, rid or 0, err.code, err.message, err.field)
            self._emit(kind or "?", rid or 0, client, err.code, {"decode": time.perf_counter() - t_recv})
            return
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
        carry: _Job | None | bool = False  # a job taken while filling a batch that must run after it
        last = 1  # the size of the last batch: how many clients are asking at once lately
        while True:
            job = self._jobs.get() if carry is False else carry
            carry = False
            if job is None:
                return
            if self._infer_batch is None or job.request.kind != "infer":
                self._finish_jobs([job], lambda j: self._run(j.request, self._queued(j), j.decode_s))
                continue
            batch, carry = self._fill_batch(job, last)
            last = len(batch)
            if len(batch) == 1:
                self._finish_jobs(batch, lambda j: self._run(j.request, self._queued(j), j.decode_s))
            else:
                self._finish_jobs(batch, self._run_batch(batch))

    def _fill_batch(self, first: _Job, last: int) -> tuple[list[_Job], _Job | None | bool]:
        """`first` and the infer jobs behind it, up to `batch_max`. A lone client never waits: the window
        (`batch_wait`) is spent only while fewer requests are in hand than the last batch had, i.e. while
        other clients that were asking together are expected. A job of another kind (a reset) ends the batch
        and is returned to run next, so each client's requests keep their order."""
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.batch_max:
            wait = deadline - time.perf_counter() if len(batch) < last else 0.0
            try:
                job = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None or job.request.kind != "infer":
                return batch, job
            batch.append(job)
        return batch, False

    def _run_batch(self, batch: list[_Job]) -> Callable[[_Job], tuple[list, list]]:
        """One call of the batch handler for every job; returns each job's (reply, telemetry) frames."""
        t0 = time.perf_counter()
        queued = {id(j): self._queued(j) for j in batch}
        try:
            results = list(self._infer_batch([j.request for j in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"infer_batch returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # noqa: BLE001 - every request in the batch gets this error
            log.exception("infer_batch handler failed")
            results = [e] * len(batch)
        handler_s = time.perf_counter() - t0
        by_job = {id(j): r for j, r in zip(batch, results, strict=True)}
        return lambda j: self._encode_result(j.request, by_job[id(j)], handler_s, queued[id(j)], j.decode_s)

    @staticmethod
    def _queued(job: _Job) -> float:
        return time.perf_counter() - job.t_recv - job.decode_s

    def _finish_jobs(self, jobs: list[_Job], run: Callable[[_Job], tuple[list, list]]) -> None:
        for job in jobs:
            try:
                frames, tele = run(job)
            except Exception:  # _run already turns handler failures into error replies
                log.exception("unexpected error in the inference worker")
                frames = encode(
                    "error",
                    error_payload(Code.HANDLER_ERROR, "internal server error"),
                    request_id=job.request.request_id,
                )
                tele = []
            if job.future is not None:
                job.future.set_result(self._as_message(frames))
            else:
                self._outbox.put(("reply", job.envelope, frames))
            if tele:
                self._outbox.put(("telemetry", tele))
        self._wake()

    def _run(self, req: Request, queue_s: float, decode_s: float) -> tuple[list, list]:
        """Call the handler and encode its reply (or the error it caused). Returns (reply, telemetry) frames."""
        t0 = time.perf_counter()
        try:
            result = self._handlers[req.kind](req)
        except Exception as e:  # noqa: BLE001 - encoded as this request's error reply
            result = e
        return self._encode_result(req, result, time.perf_counter() - t0, queue_s, decode_s)

    def _encode_result(
        self, req: Request, result: Any, handler_s: float, queue_s: float, decode_s: float
    ) -> tuple[list, list]:
        """A handler's result (or the exception it raised) as (reply, telemetry) frames."""
        telemetry: Mapping[str, Any] = {}
        code: str | None = None
        if isinstance(result, ProtocolError):  # the handler's own, deliberate error (e.g. an unknown concept)
            code, message, fld = result.code, result.message, result.field
        elif isinstance(result, Exception):
            log.error("%s handler failed", req.kind, exc_info=result)
            code, message, fld = (
                Code.HANDLER_ERROR,
                f"{req.kind} handler raised {type(result).__name__}: {result}",
                None,
            )
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


def _n_envelope(frames: list[zmq.Frame]) -> int:
    """Routing frames before the header: [id] from a DEALER, [id, b""] from a REQ socket."""
    return 2 if len(frames) > 2 and len(frames[1]) == 0 else 1


def _resolve_handlers(handler: Any) -> dict[str, Handler]:
    if isinstance(handler, Mapping):
        unknown = sorted(set(handler) - set(HANDLED_KINDS))
        if unknown:
            raise ValueError(f"no such handler kinds {unknown}; handlers exist for {HANDLED_KINDS}")
        handlers = dict(handler)
    else:
        handlers = {k: getattr(handler, k) for k in HANDLED_KINDS if callable(getattr(handler, k, None))}
    if "control" in handlers:
        control = handlers["control"]
        handlers["control"] = lambda req: control(req.payload["op"], dict(req.payload["args"]))
    return handlers


def _error_message(code: str, message: str, fld: str | None = None) -> Message:
    return Message("error", error_payload(code, message, fld))


def _to_payload(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if hasattr(result, "to_payload"):
        result = result.to_payload()
    if not isinstance(result, Mapping):
        raise TypeError(f"handler returned a {type(result).__name__}, expected a mapping")
    return dict(result)
