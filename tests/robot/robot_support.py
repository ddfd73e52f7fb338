"""Helpers for the robot node tests (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
