"""The knobs page's request checks over raw HTTP (http.client and sockets), against a RECORDING control
socket (a real wire Server that logs the ops it gets; the full robot node is in test_ui.py): only the
operator's own page, with this launch's secret, reaches the robot; everything else is refused with a 4xx
and a message, never a traceback, and never reaches the control socket."""

from __future__ import annotations

import json
import socket
import threading
from urllib.parse import urlsplit

import pytest
from robot_support import PageSession
from support import free_address, wait_for

from robot.control import control_server
from robot.ui.server import MAX_BODY, KnobsUI


@pytest.fixture
def recording_robot():
    """A control socket that records (op, args) and answers a status."""
    ops: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def handle(op: str, args: dict) -> dict:
        with lock:
            if op != "status":
                ops.append((op, args))
        return {"status": {"mode": "running"}}

    server = control_server(handle, free_address()).start()
    try:
        yield server.address, ops
    finally:
        server.close()


@pytest.fixture
def page(recording_robot):
    address, ops = recording_robot
    with KnobsUI(policy=free_address(), robot=address, operator_token="op-secret") as ui:
        yield ui, PageSession(ui.url), ops


def raw(ui: KnobsUI, data: bytes) -> tuple[int, bytes]:
    """Send `data` as is; (status, body) of the answer. A server that waits for more body times out here."""
    u = urlsplit(ui.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_printed_url_logs_in_once_with_a_strict_http_only_cookie(page):
    ui, session, _ = page
    attrs = [a.strip().lower() for a in session.set_cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs
    assert ui.guard.secret in ui.url and ui.guard.secret not in ui.base_url
    status, headers, body = session.request("GET", "/", headers={"Cookie": session.cookie})
    assert status == 200 and b"<title>vla-steer knobs</title>" in body
    assert (
        headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in headers["content-security-policy"]
    )
    # Without the cookie, or with a wrong secret: the page says what to do.
    for path, cookie in (("/", ""), ("/?token=guess", ""), ("/", "vla_steer_knobs=guess")):
        status, _, body = session.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        assert status == 403 and b"open the URL" in body, (path, cookie)
    status, _, body = session.request("GET", "/api/state")
    assert status == 403 and "no valid session" in json.loads(body)["error"]


def test_the_operators_page_stops_resumes_with_the_operator_token(page):
    _, session, ops = page
    status, reply = session.post("/api/stop")
    assert status == 200 and reply["robot"] == {"mode": "running"}
    status, _ = session.post("/api/resume")
    assert status == 200
    assert ops == [("stop", {}), ("resume", {"token": "op-secret"})]
    assert session.get("/api/state")["robot_ok"] in (True, False)  # a snapshot, with the session


def test_without_the_operator_token_the_page_stops_but_says_why_it_cannot_resume(recording_robot):
    address, ops = recording_robot
    with KnobsUI(policy=free_address(), robot=address) as ui:
        session = PageSession(ui.url)
        assert session.post("/api/stop")[0] == 200
        status, reply = session.post("/api/resume")
    assert status == 400 and "no operator token" in reply["error"]
    assert ops == [("stop", {})]


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({"Host": "evil.example"}, 421, "DNS-rebinding"),
        ({"Host": "evil.example:8765"}, 421, "DNS-rebinding"),
        ({"Origin": "http://127.0.0.1:1"}, 403, "origin 'http://127.0.0.1:1'"),
        ({"Origin": "http://evil.example"}, 403, "only the page served at"),
        ({"Origin": "null"}, 403, "origin 'null'"),
        ({"Cookie": ""}, 403, "no valid session"),
        ({"Cookie": "vla_steer_knobs=guess"}, 403, "no valid session"),
        ({"Content-Type": "text/plain"}, 415, "application/json"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        ({"Content-Type": ""}, 415, "application/json"),
    ],
)
def test_state_changing_calls_are_refused_unless_they_come_from_the_page(
    page, headers, status, message, capfd
):
    ui, session, ops = page
    for path in ("/api/knobs", "/api/stop", "/api/resume"):
        got, reply = session.post(path, {"op": "off"}, **headers)
        assert (got, ops) == (status, []), reply
        assert message in reply["error"]
        assert ui.refusals[-1] == ("POST", path, status)
    assert "Traceback" not in capfd.readouterr().err


def test_no_origin_is_refused_and_get_checks_the_host_too(page):
    ui, session, ops = page
    status, _, body = session.request(
        "POST", "/api/stop", b"{}", {"Content-Type": "application/json", "Cookie": session.cookie}
    )
    assert status == 403 and "origin None" in json.loads(body)["error"]
    status, _, _ = session.request(
        "GET", "/api/state", headers={"Cookie": session.cookie, "Host": "evil.example"}
    )
    assert status == 421
    status, _, _ = session.request(
        "GET", "/events", headers={"Cookie": session.cookie, "Host": "evil.example"}
    )
    assert status == 421
    assert ops == []


@pytest.mark.parametrize(
    ("length", "status"),
    [
        ("Content-Length: -1\r\n", 400),
        ("Content-Length: abc\r\n", 400),
        ("Content-Length: 1e3\r\n", 400),
        ("Content-Length: +2\r\n", 400),
        (f"Content-Length: {MAX_BODY + 1}\r\n", 413),
        ("Content-Length: 99999999999999999999999\r\n", 413),
        ("Content-Length: 2\r\nContent-Length: 2\r\n", 411),
        ("", 411),
        ("Transfer-Encoding: chunked\r\n", 411),
    ],
)
def test_bad_content_lengths_are_refused_without_reading_past_the_limit(page, length, status, capfd):
    ui, session, ops = page
    u = urlsplit(ui.base_url)
    head = (
        f"POST /api/stop HTTP/1.1\r\nHost: {u.netloc}\r\nOrigin: {session.origin}\r\n"
        f"Cookie: {session.cookie}\r\nContent-Type: application/json\r\n{length}\r\n"
    )
    got, body = raw(
        ui, head.encode("utf-8") + b"{}" + b" " * 100
    )  # the socket stays open: no EOF to wait for
    assert got == status, body
    assert json.loads(body)["error"]
    assert ops == []
    assert "Traceback" not in capfd.readouterr().err
    assert session.post("/api/stop")[0] == 200  # the server is still serving
    wait_for(lambda: ops == [("stop", {})], 5, what="the stop")
