"""Helpers for the robot node tests (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from support import wait_for

from robot.config import RobotConfig, load_robot_config
from robot.node import RobotNode


def gentle_config(liveness: float = 0.5) -> RobotConfig:
    """The shipped MuJoCo config with small per-step deltas, so a random policy moves the arm gently, and a
    liveness window wide enough for this shared, loaded test machine (a killed node is seen at once
    through its dropped connection, whatever the window)."""
    cfg = load_robot_config("ur5e_mujoco")
    act = cfg.action.model_copy(update={"translation_scale": 0.01, "rotation_scale": 0.02})
    # Inference here takes up to a second under load: chunks stay usable for 5 s.
    faults = cfg.faults.model_copy(
        update={"policy_liveness": liveness, "heartbeat_interval": 0.02, "max_action_age": 5.0}
    )
    obs = cfg.observation.model_copy(update={"cameras": {}})  # black frames: CPU rendering is ~0.2 s here
    return cfg.model_copy(update={"action": act, "faults": faults, "observation": obs})


def until(node: RobotNode, condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """`support.wait_for`, with the node's status in the failure message."""
    try:
        return wait_for(condition, timeout, interval=0.002, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; node status {node.status_dict()}") from None


class PageSession:
    """The knobs page over raw HTTP (http.client), as the operator's browser uses it: opening the URL the
    command printed turns its secret into the session cookie; POSTs carry the page's own Origin."""

    def __init__(self, url: str):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.origin = f"http://{self.host}:{self.port}"
        status, headers, _ = self.request("GET", f"/?{u.query}")
        assert status == 303, f"the printed URL did not log in ({status})"
        self.set_cookie = headers["set-cookie"]
        self.cookie = self.set_cookie.split(";", 1)[0]

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict | None = None, **headers: str) -> tuple[int, dict]:
        """POST JSON as the operator's page does; `headers` override (Content_Type= -> Content-Type)."""
        base = {"Origin": self.origin, "Content-Type": "application/json", "Cookie": self.cookie}
        base.update({k.replace("_", "-"): v for k, v in headers.items()})
        status, _, data = self.request("POST", path, json.dumps(body or {}).encode(), base)
        return status, json.loads(data)

    def get(self, path: str) -> dict:
        status, _, data = self.request("GET", path, headers={"Cookie": self.cookie})
        assert status == 200, (status, data)
        return json.loads(data)
