"""The one schema of what a node observes and what a step records, shared by sim, robot and policies.

An `Observation` is what a policy is asked to act on: a language instruction, camera images keyed by the
policy's image keys (uint8 [H, W, 3], row 0 at the top) and, when the policy takes it, a proprioceptive
state vector. It travels as the payload of an `infer` request (`to_payload` / `from_payload`), and
`from_payload` is where every rule about a valid observation lives: errors name the key and what was
wrong, values are checked (finite state, after the cast to float32), not only types.

A `Step` is one executed control step as the node that stepped the world records it: the observation the
action was chosen on, the chunk and the executed action, the end-effector pose and velocity (world frame:
`ee_pos` [3] m, `ee_quat` [4] x, y, z, w, `ee_vel` [3] m/s), reward, times, the steering state in force and
any activations the policy returned.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_INSTRUCTION_CHARS = 2000  # a task instruction, not a document: bounds tokenizer and attention cost


@dataclass
class Observation:
    instruction: str
    images: dict[str, np.ndarray]
    state: np.ndarray | None = None

    def to_payload(self) -> dict[str, Any]:
        """The observation as an infer request payload."""
        out: dict[str, Any] = {"instruction": self.instruction, "images": dict(self.images)}
        if self.state is not None:
            out["state"] = self.state
        return out

    @classmethod
    def from_payload(
        cls,
        payload: Mapping[str, Any],
        image_keys: Mapping[str, tuple[int, int, int]],
        state_dim: int | None = None,
    ) -> Observation:
        """Validate an infer payload against what the policy takes; errors name the key and what was wrong."""
        instruction = payload.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("observation.instruction must be a non-empty string")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise ValueError(
                f"observation.instruction is {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}"
            )
        images = payload.get("images")
        if not isinstance(images, Mapping):
            raise ValueError(f"observation.images must be a map with keys {sorted(image_keys)}")
        missing = sorted(set(image_keys) - set(images))
        if missing:
            raise ValueError(f"observation.images is missing {missing} (expected {sorted(image_keys)})")
        checked = {}
        for key, shape in image_keys.items():
            img = images[key]
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != tuple(shape):
                got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ValueError(f"observation.images.{key} must be uint8{list(shape)}, got {got}")
            checked[key] = img
        state = payload.get("state")
        if state_dim is not None:
            if not isinstance(state, np.ndarray) or state.shape != (state_dim,):
                got = list(state.shape) if isinstance(state, np.ndarray) else type(state).__name__
                raise ValueError(f"observation.state must be a float array of shape [{state_dim}], got {got}")
            if state.dtype.kind not in "fiu":
                raise ValueError(f"observation.state must be numeric, got {state.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                state = state.astype(np.float32)  # checked after the cast: 1e39 in float64 is inf here
            if not np.all(np.isfinite(state)):
                raise ValueError("observation.state contains NaN or inf (or a value beyond float32)")
        else:
            state = None
        return cls(instruction, checked, state)


@dataclass
class Step:
    """One executed control step, as recorded by the node that stepped the world."""

    observation: Observation
    action: np.ndarray  # executed [action_dim]
    action_chunk: np.ndarray | None = None  # the chunk `action` came from [chunk, action_dim]
    ee_pos: np.ndarray | None = None
    ee_quat: np.ndarray | None = None
    ee_vel: np.ndarray | None = None
    reward: float | None = None
    t_wall: float = field(default_factory=time.time)
    t_sim: float | None = None
    steering: dict[str, Any] | None = None
    activations: dict[str, np.ndarray] = field(default_factory=dict)
