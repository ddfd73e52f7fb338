"""What the episode runner needs from an environment, independent of the simulator behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


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

    def payload(self) -> dict[str, Any]:
        """The observation as an infer request payload (`policies.base.Observation.from_payload`)."""
        out: dict[str, Any] = {"instruction": self.instruction, "images": self.images}
        if self.state is not None:
            out["state"] = self.state
        return out


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
