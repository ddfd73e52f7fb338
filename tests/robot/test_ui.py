"""The knobs page in headless Chromium against a real policy node process and the MuJoCo robot node:
moving a slider changes the strength at the policy node; the stop button (and Esc) stops the arm; a page
from another origin, in the same browser, can neither turn a knob nor stop nor resume."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading

import numpy as np
import pytest
from robot_support import PageSession, gentle_config, until
from support import free_address, wait_for

from robot.control import ControlError
from robot.shared import Mode, Reason
from robot.ui.server import KnobsUI
from vla_steer.core.rollouts import open_store
from vla_steer.wire import Client


def chromium() -> str | None:
    for name in (os.environ.get("VLA_STEER_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def test_ui_refuses_a_non_loopback_bind():
    with pytest.raises(ValueError, match="refusing to serve"):
        KnobsUI(policy=free_address(), robot=None, host="0.0.0.0")


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no chromium binary (apt-get install -y chromium, or set VLA_STEER_CHROMIUM)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download)"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_slider_sets_the_policy_knob_and_stop_stops_the_arm(browser, tmp_path, policy_node, robot_node):
    address = free_address()
    policy_node(address)
    node = robot_node(address, out=tmp_path / "runs")
    with (
        KnobsUI(policy=address, robot=node.control_address, operator_token=node.operator_token) as ui,
        Client(address, heartbeat_interval=None) as c,
    ):
        until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
        page = browser.new_page()
        page.goto(ui.url)
        concept = sorted(c.list_knobs())[0]
        slider = page.locator(f'input[data-knob="{concept}"]')
        slider.wait_for(timeout=10_000)
        slider.fill("4")  # sets the value and fires input + change, as a drag does
        state = wait_for(
            lambda: (k := c.get_knobs([concept])[concept])["strength"] == 4.0 and k, 5, what="knob"
        )
        assert state["enabled"]  # setting a knob turns it on
        toggle = page.locator(f'input[data-toggle="{concept}"]')
        toggle.wait_for(timeout=5_000)
        # The page shows the node's state from its event stream: wait until it shows the knob on. (Predicates
        # as functions: the page's Content-Security-Policy forbids evaluating strings.)
        page.wait_for_function(
            f"() => document.querySelector('input[data-toggle=\"{concept}\"]').checked", timeout=5_000
        )
        # click, not uncheck(): the event stream may re-render the box from a snapshot taken before the
        # change reached the policy node, and uncheck() would call that a failed click.
        toggle.click()
        wait_for(lambda: not c.get_knobs([concept])[concept]["enabled"], 5, what="the toggle to disable it")

        page.click("#stop")
        st = until(node, lambda: (s := node.status()).mode == Mode.STOPPED and s, 5, "the stop button")
        assert st.reason == Reason.OPERATOR
        until(node, lambda: np.linalg.norm(node.status().tcp_speed[:3]) < 1e-3, 10, "the arm to come to rest")
        page.wait_for_function("() => document.body.dataset.mode === 'stopped'", timeout=5000)

        # Keyboard: r resumes, Esc stops.
        page.keyboard.press("r")
        until(node, lambda: node.status().mode in (Mode.RUNNING, Mode.HOLD), 5, "r to resume")
        page.keyboard.press("Escape")
        until(node, lambda: node.status().mode == Mode.STOPPED, 5, "Esc to stop")

        snap = PageSession(ui.url).get("/api/state")
        assert snap["robot_ok"] and snap["policy_ok"] and concept in snap["knobs"]
    node.close()
    store = open_store(tmp_path / "runs")
    events = [ev for e in store.episodes() for ev in store.load(e.id, images=False).events]
    knob_events = [ev for ev in events if ev["kind"] == "knobs"]
    assert [ev["op"] for ev in knob_events][:2] == ["set", "disable"]
    assert knob_events[0]["strengths"] == {concept: 4.0} and knob_events[0]["t"] > 0


def test_page_api_sets_knobs_reports_them_and_stops_the_arm(tmp_path, policy_node, robot_node, control):
    """The page's HTTP API without a browser: knobs reach the policy node and the robot's episode log, stop
    and resume go through the robot node's control socket, which refuses what it does not know."""
    address = free_address()
    policy_node(address)
    node = robot_node(address, out=tmp_path / "runs")
    with (
        KnobsUI(policy=address, robot=node.control_address, operator_token=node.operator_token) as ui,
        Client(address, heartbeat_interval=None) as c,
    ):
        page = PageSession(ui.url)
        until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
        concept = sorted(c.list_knobs())[0]
        status, reply = page.post("/api/knobs", {"op": "set", "strengths": {concept: 3}})
        assert reply["knobs"][concept]["enabled"] and c.get_knobs([concept])[concept]["strength"] == 3.0
        assert "mode" in page.post("/api/stop")[1]["robot"]  # the status as the stop was queued
        until(node, lambda: node.status().reason == Reason.OPERATOR, 5, "the operator stop")
        assert page.post("/api/resume")[0] == 200
        until(node, lambda: node.status().mode in (Mode.RUNNING, Mode.HOLD), 10, "the resume")
        snap = wait_for(
            lambda: (s := page.get("/api/state"))["robot_ok"] and s, 5, what="the page's robot status"
        )
        assert snap["policy_ok"] and snap["robot"]["backend"] == "mujoco"

    ctl = control(node.control_address)
    ctl.stop()
    until(node, lambda: node.status().mode == Mode.STOPPED, 5, "the stop")
    for token in (None, "", "guess", node.operator_token[:-1]):  # a client without the operator token
        with pytest.raises(ControlError, match="operator act"):
            ctl.resume(token)
    assert node.status().mode == Mode.STOPPED and not node.status().resume_pending
    with pytest.raises(ControlError, match="op must be one of"):
        ctl.request("reboot")
    with pytest.raises(ControlError, match="non-empty 'kind'"):
        ctl.request("event", kind="", data={})
    ctl.stop()
    node.close()
    store = open_store(tmp_path / "runs")
    knob_events = [
        ev for e in store.episodes() for ev in store.load(e.id, images=False).events if ev["kind"] == "knobs"
    ]
    assert [(ev["op"], ev["strengths"]) for ev in knob_events] == [("set", {concept: 3})]


ATTACK = """<!doctype html><title>another site</title><script>
// What any page the operator opens can do without a CORS preflight: "simple" cross-origin POSTs, with
// the browser's cookies where it sends them. A JSON POST needs a preflight, which the page never allows.
async function attack(target, paths) {
  for (const path of paths) {
    const body = path === "/api/knobs" ? '{"op": "set", "strengths": {"CONCEPT": 9}}' : "{}";
    await fetch(target + path, { method: "POST", mode: "no-cors", credentials: "include",
                                 headers: { "Content-Type": "text/plain" }, body }).catch(() => {});
    await fetch(target + path, { method: "POST", credentials: "include",
                                 headers: { "Content-Type": "application/json" }, body }).catch(() => {});
  }
  return "done";
}
</script>"""


@pytest.fixture
def other_site(tmp_path):
    """Another origin: a plain HTTP server on another port, serving the attacking page."""
    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_page_from_another_origin_cannot_turn_knobs_stop_or_resume(
    browser, policy_node, robot_node, other_site
):
    address = free_address()
    policy_node(address)
    node = robot_node(address, config=gentle_config(liveness=1.5))  # Chromium loads this machine too
    root, port = other_site
    context = browser.new_context()  # one browser: the operator's cookie is in it when the other page runs
    with (
        KnobsUI(policy=address, robot=node.control_address, operator_token=node.operator_token) as ui,
        KnobsUI(policy=address, robot=node.control_address) as no_token_ui,
        Client(address, heartbeat_interval=None) as c,
    ):
        concept = sorted(c.list_knobs())[0]
        (root / "attack.html").write_text(ATTACK.replace("CONCEPT", concept))
        operator = context.new_page()
        operator.goto(ui.url)
        assert operator.url == ui.base_url  # the secret left the address bar for the cookie
        until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
        before = c.get_knobs([concept])[concept]

        def attack(paths: list[str]) -> list:
            """Run the attack from both other origins (same site, other port; another site)."""
            start = len(ui.refusals)
            for site in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
                evil = context.new_page()
                evil.goto(f"{site}/attack.html")
                assert evil.evaluate(f"attack({ui.base_url.rstrip('/')!r}, {paths!r})") == "done"
                evil.close()
            # Each simple POST arrived and was refused; the JSON ones never passed the preflight.
            refused = wait_for(lambda: len(ui.refusals) - start >= 2 * len(paths) and ui.refusals[start:], 5,
                               what="the other pages' requests")  # fmt: skip
            assert {(m, path) for m, path, _ in refused} == {("POST", p) for p in paths}
            assert all(status == 403 for *_, status in refused)
            return refused

        attack(["/api/knobs", "/api/stop"])
        assert c.get_knobs([concept])[concept] == before
        ticks = node.status().ticks
        until(node, lambda: node.status().ticks > ticks + 100, 10, "the servo loop to run on")
        assert node.status().reason != Reason.OPERATOR  # the refused stop never reached the arm

        # The operator's own page stops; the other pages cannot resume; the operator's page can.
        operator.click("#stop")
        until(node, lambda: node.status().mode == Mode.STOPPED, 5, "the stop button")
        attack(["/api/resume"])
        st = node.status()
        assert st.mode == Mode.STOPPED and not st.resume_pending and st.reason == Reason.OPERATOR
        operator.click("#resume")
        until(node, lambda: node.status().mode in (Mode.RUNNING, Mode.HOLD), 15, "the resume button")

        # A page without the robot's operator token says why it cannot resume.
        operator.click("#stop")
        until(node, lambda: node.status().mode == Mode.STOPPED, 5, "the stop button")
        other = context.new_page()
        other.goto(no_token_ui.url)
        other.click("#resume")
        other.wait_for_function(
            "() => document.getElementById('msg').textContent.includes('no operator token')"
        )
        assert node.status().mode == Mode.STOPPED

        # Without the printed URL's secret the page only says how to get in.
        stranger = browser.new_page()
        stranger.goto(ui.base_url)
        assert "open the URL" in stranger.text_content("#msg")
        stranger.close()
    context.close()
