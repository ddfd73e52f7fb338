"""The policy node's telemetry stream: one `TelemetryRecord` per request on the server's PUB socket."""

from __future__ import annotations

import logging
import os
import time

import zmq

from vla_steer.wire.codec import DEFAULT_MAX_MESSAGE_BYTES, ProtocolError, decode
from vla_steer.wire.messages import TelemetryRecord
from vla_steer.wire.security import Keypair, as_keypair, public_key, socket_options

log = logging.getLogger(__name__)

TELEMETRY_TOPIC = b"vla-steer/telemetry"


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
        socket_options(self._sock, max_message_bytes, address)
        if server_key is not None:
            kp = as_keypair(keypair, True, "a CURVE subscriber") if keypair else Keypair(*zmq.curve_keypair())
            self._sock.curve_secretkey = kp.secret
            self._sock.curve_publickey = kp.public
            self._sock.curve_serverkey = public_key(server_key)
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
