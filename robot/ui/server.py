"""`vla-steer knobs ui`: a web page to turn a live policy's knobs and stop the arm.

Standard library only (`http.server.ThreadingHTTPServer`), no build step and no CDN: the page works
offline. The browser talks to this server; this server talks to the policy node (a wire `Client`'s knobs
calls) and to the robot node (its control socket, through `ControlClient`, also a wire `Client`). One poller thread keeps the latest robot status and
knob state; every page gets it pushed over Server-Sent Events (`/events`, 20 per second). Knob changes are
also reported to the robot node, which records them in the current episode with their timestamps.

    GET  /              the page              POST /api/knobs   {"op": "set", "strengths": {"fast": 4}}
    GET  /events        SSE status stream     POST /api/stop    stop the arm (servoStop, latched)
    GET  /api/state     one status snapshot   POST /api/resume  follow fresh actions again

Like the sockets, it serves loopback only unless told otherwise: the page can stop and start a robot.
Every request passes `robot/ui/guard.py` first (Host allow-list, this launch's secret as a cookie, Origin
and JSON-only bodies on every POST). Resume is an operator act: the robot node accepts it only with its
operator token (`operator_token`, read from the file `vla-steer robot` writes); without it the page can
change knobs and stop, and says why it cannot resume.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from robot.control import ControlClient, ControlError
from robot.ui.guard import Guard, Refused, new_secret
from vla_steer.wire import Client, KnobsRequest, ProtocolError, RemoteError, RequestTimeout, is_loopback

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024
KNOB_OPS = ("set", "enable", "disable", "off")
SECURITY_HEADERS = {  # no framing (clickjacking), no sniffing, nothing loaded from elsewhere
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
}


class KnobsUI:
    def __init__(
        self,
        *,
        policy: str,
        robot: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_remote: bool = False,
        server_key: Any = None,
        keypair: Any = None,
        status_hz: float = 20.0,
        operator_token: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ):
        if not (allow_remote or is_loopback(f"tcp://{host}:0")):
            raise ValueError(
                f"refusing to serve the knobs page on {host!r}: it can stop and start the robot and has no "
                "login. Serve loopback (default) and use an SSH tunnel, or pass allow_remote=True."
            )
        self.period = 1.0 / status_hz
        self.guard = Guard(new_secret(), host, allowed_hosts, MAX_BODY)
        self.operator_token = operator_token
        self.refusals: list[tuple[str, str, int]] = []  # (method, path, HTTP status), newest last
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"robot": None, "knobs": {}, "policy_ok": False, "robot_ok": False}
        self._knobs_at = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.robot: ControlClient | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.policy = Client(policy, timeout=1.0, retries=0, heartbeat_interval=None,
                             server_key=server_key, keypair=keypair)  # fmt: skip
        try:  # a port in use, or a bad address, must not leave the clients' sockets open
            self.robot = ControlClient(robot, timeout=0.5) if robot else None
            self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        except BaseException:
            self.close()
            raise
        self.httpd.daemon_threads = True
        netloc = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{netloc}:{self.httpd.server_address[1]}/"
        self.url = f"{self.base_url}?token={self.guard.secret}"  # shown once; opening it sets the cookie
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, name="knobs-ui-http", daemon=True),
            threading.Thread(target=self._poll, name="knobs-ui-poll", daemon=True),
        ]

    def __enter__(self) -> KnobsUI:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self.httpd is not None:
            if self._threads[0].is_alive():
                self.httpd.shutdown()  # waits for serve_forever, so only once it runs
            self.httpd.server_close()
        if len(self._threads) > 1 and self._threads[1].is_alive():
            self._threads[1].join(5.0)  # the poller uses the clients closed next
        self.policy.close()
        if self.robot is not None:
            self.robot.close()

    # -- state

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    def _update(self, **values: Any) -> None:
        with self._lock:
            self._snapshot.update(values, t=time.time())

    def _poll(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            if self.robot is not None:
                try:
                    self._update(robot=_finite(self.robot.status()), robot_ok=True, robot_error=None)
                except ControlError as e:
                    self._update(robot_ok=False, robot_error=str(e))
            if t0 - self._knobs_at > 0.5:
                self._knobs_at = t0
                try:
                    self._update(knobs=self.policy.get_knobs(), policy_ok=True, policy_error=None)
                except (RequestTimeout, RemoteError, ProtocolError) as e:
                    self._update(policy_ok=False, policy_error=str(e))
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    # -- actions

    def knobs(self, body: dict) -> dict:
        op = body.get("op")
        if op not in KNOB_OPS:
            raise ValueError(f"op must be one of {KNOB_OPS}, got {op!r}")
        concepts = body.get("concepts")
        strengths = body.get("strengths") or {}
        if concepts is not None and not (
            isinstance(concepts, list) and all(isinstance(c, str) for c in concepts)
        ):
            raise ValueError("concepts must be a list of names")
        if not isinstance(strengths, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in strengths.values()
        ):
            raise ValueError("strengths must map concept names to finite numbers")
        req = KnobsRequest(op, tuple(concepts) if concepts is not None else None, dict(strengths))
        state = self.policy.knobs(req)
        self._update(knobs=state, policy_ok=True)
        if self.robot is not None:  # the episode log gets the change with its time; best effort
            try:
                self.robot.event("knobs", op=op, concepts=concepts, strengths=strengths, state=state)
            except ControlError as e:
                log.warning("could not report the knob change to the robot node: %s", e)
        return {"knobs": state}

    def refused(self, method: str, path: str, e: Refused) -> None:
        log.warning("refused %s %s: %s", method, urlsplit(path).path, e.message)
        with self._lock:
            self.refusals = [*self.refusals[-99:], (method, urlsplit(path).path, int(e.status))]

    def robot_op(self, op: str) -> dict:
        if self.robot is None:
            raise ControlError("no robot node configured (--robot)")
        if op == "resume":
            if self.operator_token is None:
                raise ControlError(
                    "this page has no operator token for the robot node, so it cannot resume: start "
                    "`vla-steer knobs ui` as the user running `vla-steer robot` (or pass --operator-token-file)"
                )
            reply = self.robot.resume(self.operator_token)
        else:
            reply = self.robot.request(op)
        self._update(robot=_finite(reply["status"]), robot_ok=True)
        return {"robot": _finite(reply["status"])}


def _finite(d: Any) -> Any:
    """JSON has no NaN: None instead (the page shows a dash)."""
    if isinstance(d, float):
        return d if math.isfinite(d) else None
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_finite(v) for v in d]
    return d


def _handler(ui: KnobsUI) -> type[BaseHTTPRequestHandler]:
    guard = ui.guard

    class Handler(BaseHTTPRequestHandler):
        server_version = "vla-steer-knobs"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: HTTPStatus, data: bytes, ctype: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in {**SECURITY_HEADERS, **headers}.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(data)

        def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _refuse(self, e: Refused, html: bool = False) -> None:
            ui.refused(self.command, self.path, e)
            self.close_connection = True  # a refused request's body is never read
            if html:
                page = f"<!doctype html><title>vla-steer knobs</title><p id=msg>{escape(e.message)}</p>"
                self._send(e.status, page.encode(), "text/html; charset=utf-8")
            else:
                self._json({"error": e.message}, e.status)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urlsplit(self.path).path
            try:
                guard.host(self.headers)
                if path == "/" and guard.token_in_url(self.path):  # the printed URL: secret -> cookie
                    self._send(
                        HTTPStatus.SEE_OTHER, b"", "text/plain", Location="/", Set_Cookie=guard.cookie()
                    )
                    return
                guard.session(self.headers)
            except Refused as e:
                self._refuse(e, html=path in ("/", "/index.html"))
                return
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
            elif path == "/api/state":
                self._json(ui.snapshot())
            elif path == "/events":
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                try:
                    while not ui._stop.is_set():
                        self.wfile.write(b"data: " + json.dumps(ui.snapshot()).encode() + b"\n\n")
                        self.wfile.flush()
                        time.sleep(ui.period)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            else:
                self._json({"error": f"no such page {path!r}"}, HTTPStatus.NOT_FOUND)

        def do_POST(self) -> None:  # noqa: N802
            try:
                host = guard.host(self.headers)
                guard.origin(self.headers, host)
                guard.session(self.headers)
                n = guard.body_length(self.headers)
            except Refused as e:
                self._refuse(e)
                return
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                if self.path == "/api/knobs":
                    self._json(ui.knobs(body))
                elif self.path in ("/api/stop", "/api/resume"):
                    self._json(ui.robot_op(self.path.rsplit("/", 1)[1]))
                else:
                    self._json({"error": f"no such action {self.path!r}"}, HTTPStatus.NOT_FOUND)
            except (ValueError, RemoteError, ControlError) as e:
                self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
            except (RequestTimeout, ProtocolError) as e:
                self._json({"error": str(e)}, HTTPStatus.BAD_GATEWAY)

    return Handler
