"""The robot node's control socket: stop, resume, status, event, over the wire protocol's "control" kind.

The node serves a wire `Server` whose one handler is `control(op, args)`; the knobs UI and the tests talk
to it with `ControlClient`, a wire `Client`. Every op answers the node's status:

    status                                   -> {"status": {...}}
    stop                                     -> servoStop now (latched)
    resume                                   -> follow fresh actions again (refused while the policy is lost)
    event   {"kind": "knobs", "data": {...}} -> recorded in the current episode with its timestamp

Like the policy socket it binds loopback only unless told otherwise: whoever reaches it can stop or
resume the arm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vla_steer.wire import Client, Code, ProtocolError, RemoteError, RequestTimeout, Server

DEFAULT_CONTROL = "tcp://127.0.0.1:5570"
OPS = ("status", "stop", "resume", "event")
MAX_CONTROL_BYTES = 64 * 1024  # ops and events are small; nothing bigger reaches the handler
REFUSED = "refused"  # error code of an op the node declines in its current state (resume while lost)


class ControlError(RuntimeError):
    """The robot node refused a control request, or did not answer."""


def control_server(
    handler: Callable[[str, dict[str, Any]], dict[str, Any]],
    address: str = DEFAULT_CONTROL,
    *,
    allow_insecure: bool = False,
) -> Server:
    """A wire `Server` (bound, not started) answering `handler(op, args)` for the ops in `OPS`."""

    def control(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op not in OPS:
            raise ProtocolError(Code.BAD_PAYLOAD, f"op must be one of {OPS}, got {op!r}", "op")
        return handler(op, args)

    return Server(
        {"control": control}, address, allow_insecure=allow_insecure, max_message_bytes=MAX_CONTROL_BYTES
    )


class ControlClient:
    """Talks to a robot node's control socket. Refusals and timeouts raise `ControlError`.

    No retries: an event sent twice would be recorded twice.
    """

    def __init__(self, address: str = DEFAULT_CONTROL, *, timeout: float = 1.0):
        self.address = address
        self.timeout = timeout
        self._client = Client(address, timeout=timeout, retries=0, heartbeat_interval=None)

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self._client.control(op, **args)
        except RemoteError as e:
            raise ControlError(e.message) from None
        except RequestTimeout:
            raise ControlError(
                f"the robot node at {self.address} did not answer {op!r} within {self.timeout} s"
            ) from None

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def stop(self) -> dict[str, Any]:
        return self.request("stop")

    def resume(self) -> dict[str, Any]:
        return self.request("resume")

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        return self.request("event", kind=kind, data=data, t=time.time())

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
