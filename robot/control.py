"""The robot node's control socket: stop, resume, status, event, over the wire protocol's "control" kind.

The node serves a wire `Server` whose one handler is `control(op, args)`; the knobs UI and the tests talk
to it with `ControlClient`, a wire `Client`. Every op answers the node's status:

    status                                   -> {"status": {...}}
    stop                                     -> servoStop now (latched)
    resume  {"token": operator token}        -> follow fresh actions again, once the arm is at rest
                                                (refused without the token, or while the policy is lost)
    event   {"kind": "knobs", "data": {...}} -> recorded in the current episode with its timestamp

Like the policy socket it binds loopback only unless told otherwise. Whoever reaches it can stop the arm
(stopping is always safe), but resume is an operator act: it needs the node's per-launch operator token,
which the node keeps in memory and `vla-steer robot` writes to a file only its user can read
(`operator_token_path`). The knobs page reads that file; a policy-side client key or any other process
that can reach the socket does not make a resume. (A process running as the operator's user can read
the file: the operator's account is the boundary, as it is for killing the node.)
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vla_steer.wire import Client, Code, ProtocolError, RemoteError, RequestTimeout, Server

DEFAULT_CONTROL = "tcp://127.0.0.1:5570"
OPS = ("status", "stop", "resume", "event")
MAX_CONTROL_BYTES = 64 * 1024  # ops and events are small; nothing bigger reaches the handler
REFUSED = "refused"  # error code of an op the node declines in its current state (resume while lost)
NOT_OPERATOR = "not_operator"  # error code of a resume without the operator token


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


def new_operator_token() -> str:
    return secrets.token_urlsafe(32)


def check_operator_token(given: Any, token: str) -> None:
    """Raise unless `given` is the node's operator token (compared in constant time)."""
    if not (isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())):
        raise ProtocolError(
            NOT_OPERATOR,
            "resume is an operator act: it needs this robot node's operator token (the knobs page started "
            "by the operator, or the robot console, has it); a client key is not enough",
            "token",
        )


def operator_token_path(control: str) -> Path:
    """Where `vla-steer robot` keeps the operator token of the node serving `control`: the user's runtime
    directory ($XDG_RUNTIME_DIR, else ~/.cache), one file per control address."""
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "vla-steer" / f"robot-{re.sub(r'[^A-Za-z0-9.-]+', '_', control)}.operator"


def write_operator_token(path: Path, token: str) -> None:
    """Write `token` readable by this user only (the directory too)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(token)


def read_operator_token(path: Path) -> str | None:
    """The token in `path`, or None when there is none (no robot node running as this user)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


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

    def resume(self, token: str | None) -> dict[str, Any]:
        """Resume (the operator's act): `token` is the node's operator token."""
        return self.request("resume", token=token)

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        return self.request("event", kind=kind, data=data, t=time.time())

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
