"""The knobs page in headless Chromium against a real policy node process and the MuJoCo robot node:
moving a slider changes the strength at the policy node; the stop button (and Esc) stops the arm."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from robot_support import until
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
        KnobsUI(policy=address, robot=node.control_address) as ui,
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
        # The page shows the node's state from its event stream: wait until it shows the knob on.
        page.wait_for_function(
            f"document.querySelector('input[data-toggle=\"{concept}\"]').checked", timeout=5_000
        )
        # click, not uncheck(): the event stream may re-render the box from a snapshot taken before the
        # change reached the policy node, and uncheck() would call that a failed click.
        toggle.click()
        wait_for(lambda: not c.get_knobs([concept])[concept]["enabled"], 5, what="the toggle to disable it")

        page.click("#stop")
        st = until(node, lambda: (s := node.status()).mode == Mode.STOPPED and s, 5, "the stop button")
        assert st.reason == Reason.OPERATOR
        until(node, lambda: np.linalg.norm(node.status().tcp_speed[:3]) < 1e-3, 10, "the arm to come to rest")
        page.wait_for_function("document.body.dataset.mode === 'stopped'", timeout=5000)

        # Keyboard: r resumes, Esc stops.
        page.keyboard.press("r")
        until(node, lambda: node.status().mode in (Mode.RUNNING, Mode.HOLD), 5, "r to resume")
        page.keyboard.press("Escape")
        until(node, lambda: node.status().mode == Mode.STOPPED, 5, "Esc to stop")

        snap = json.loads(urllib.request.urlopen(ui.url + "api/state", timeout=5).read())
        assert snap["robot_ok"] and snap["policy_ok"] and concept in snap["knobs"]
    node.close()
    store = open_store(tmp_path / "runs")
    events = [ev for e in store.episodes() for ev in store.load(e.id, images=False).events]
    knob_events = [ev for ev in events if ev["kind"] == "knobs"]
    assert [ev["op"] for ev in knob_events][:2] == ["set", "disable"]
    assert knob_events[0]["strengths"] == {concept: 4.0} and knob_events[0]["t"] > 0


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {"status": e.code, **json.loads(e.read())}


def test_page_api_sets_knobs_reports_them_and_stops_the_arm(tmp_path, policy_node, robot_node, control):
    """The page's HTTP API without a browser: knobs reach the policy node and the robot's episode log, stop
    and resume go through the robot node's control socket, which refuses what it does not know."""
    address = free_address()
    policy_node(address)
    node = robot_node(address, out=tmp_path / "runs")
    with (
        KnobsUI(policy=address, robot=node.control_address) as ui,
        Client(address, heartbeat_interval=None) as c,
    ):
        until(node, lambda: node.status().mode == Mode.RUNNING, 30, "the arm to follow the policy")
        concept = sorted(c.list_knobs())[0]
        reply = post(ui.url + "api/knobs", {"op": "set", "strengths": {concept: 3}})
        assert reply["knobs"][concept]["enabled"] and c.get_knobs([concept])[concept]["strength"] == 3.0
        assert "mode" in post(ui.url + "api/stop", {})["robot"]  # the status as the stop was queued
        until(node, lambda: node.status().reason == Reason.OPERATOR, 5, "the operator stop")
        post(ui.url + "api/resume", {})
        until(node, lambda: node.status().mode in (Mode.RUNNING, Mode.HOLD), 5, "the resume")
        state = ui.url + "api/state"
        snap = wait_for(lambda: (s := json.loads(urllib.request.urlopen(state, timeout=5).read()))["robot_ok"] and s,
                        5, what="the page's robot status")  # fmt: skip
        assert snap["policy_ok"] and snap["robot"]["backend"] == "mujoco"

    ctl = control(node.control_address)
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
