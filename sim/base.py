"""What the episode runner needs from an environment, independent of the simulator behind it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vla_steer.wire import Observation


@dataclass
class SimObservation:
    """One observation: what the policy sees (images, state, instruction) plus end-effector logging.

    `images` are keyed by the policy's image keys, uint8 [H, W, 3], right side up (row 0 at the top).
    `state` is None when the policy takes no state. End-effector values are in the world frame:
    `ee_pos` [3] m, `ee_quat` [4] (x, y, z, w), `ee_vel` [3] linear velocity in m/s.
    """

    instruction: str
    images: dict[str, np.ndarray]
    state: np.ndarray | None
    ee_pos: np.ndarray
    ee_quat: np.ndarray
    ee_vel: np.ndarray
    t_sim: float

    @property
    def observation(self) -> Observation:
        """What the policy is asked to act on (`client.infer(sim_obs.observation)`), in the wire's schema."""
        return Observation(self.instruction, self.images, self.state)


@dataclass
class StepResult:
    observation: SimObservation
    reward: float
    info: dict[str, Any] = field(default_factory=dict)


class SimEnv(Protocol):
    """An environment the runner can drive. `step` takes one policy action (action_dim floats)."""

    instruction: str
    action_dim: int

    def reset(self, seed: int | None = None) -> SimObservation: ...

    def step(self, action: np.ndarray) -> StepResult: ...

    def success(self) -> bool: ...

    def close(self) -> None: ...


DEFAULT_IMAGE_SHAPE = (224, 224, 3)  # without a policy to ask (OpenVLA's and pi0's resolution)


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) -> axis * angle, as robosuite's and openpi's LIBERO code compute it (no sign flip)."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


def image_shapes(
    image_size: tuple[int, int] | None, cameras: Mapping[str, str], info: Any | None
) -> dict[str, tuple[int, int, int]]:
    """Policy image key -> (H, W, 3) to render: the policy's (hello reply), else the config's."""
    if info is not None and info.image_keys:
        shapes = {k: tuple(int(d) for d in s) for k, s in info.image_keys.items()}
        for k, s in shapes.items():
            if len(s) != 3 or s[2] != 3:
                raise ValueError(
                    f"policy image {k!r} has shape {list(s)}; the simulator renders RGB [H, W, 3]"
                )
        if image_size is not None:
            wrong = {k: s for k, s in shapes.items() if s[:2] != tuple(image_size)}
            if wrong:
                raise ValueError(f"sim config image_size {list(image_size)} != policy's {wrong}")
        return shapes
    h, w = image_size or DEFAULT_IMAGE_SHAPE[:2]
    return {k: (h, w, 3) for k in cameras}


def camera_map(cameras: Mapping[str, str], shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, str]:
    """Policy image key -> simulator camera. A one-image policy with an unmapped key takes the first camera."""
    keys = list(shapes)
    if len(keys) == 1 and keys[0] not in cameras:
        return {keys[0]: next(iter(cameras.values()))}
    missing = [k for k in keys if k not in cameras]
    if missing:
        raise ValueError(
            f"the policy wants images {keys}; sim config `cameras` has no camera for {missing} (it maps {dict(cameras)})"
        )
    return {k: cameras[k] for k in keys}


def to_osc_action(action: np.ndarray, gripper: str, binarize: bool, scale: float = 1.0) -> np.ndarray:
    """A policy action (dx dy dz droll dpitch dyaw gripper) -> robosuite/LIBERO OSC_POSE delta input:
    deltas scaled and clipped to [-1, 1], gripper mapped to the simulators' -1 open / +1 close from the
    policy's convention (`close_positive`: as is; `open_positive`: negated; `open_unit`: 1 = open in [0, 1])."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,) or not np.all(np.isfinite(a)):
        raise ValueError(f"action must be 7 finite floats, got {a.tolist()}")
    out = np.empty(7)
    out[:6] = np.clip(a[:6] * scale, -1.0, 1.0)
    g = a[6]
    if gripper == "open_positive":
        g = -g
    elif gripper == "open_unit":
        g = 1.0 - 2.0 * g
    out[6] = np.sign(g) if binarize else np.clip(g, -1.0, 1.0)
    return out
