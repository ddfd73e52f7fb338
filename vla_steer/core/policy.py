"""The policy interface: what the policy node serves and steers.

A policy turns an observation (camera images, optional proprioceptive state, a language instruction)
into an action chunk, and exposes its steerable backbone (gated MLPs, unembedding, tokenizer) so
discovery and the Steerer can work on it without knowing which VLA it is.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_steer.core.backbone import Backbone

MAX_INSTRUCTION_CHARS = 2000  # a task instruction, not a document: bounds tokenizer and attention cost


@dataclass(frozen=True)
class PolicySpec:
    """What a client needs to know to talk to a policy (sent in the hello reply)."""

    name: str
    action_dim: int
    chunk_length: int
    control_hz: float
    image_keys: dict[str, tuple[int, int, int]]  # key -> (H, W, 3) uint8
    state_dim: int | None = None
    action_space: str = "ee_delta"  # what the action vector means; documented per policy


@dataclass
class Observation:
    instruction: str
    images: dict[str, np.ndarray]
    state: np.ndarray | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any], spec: PolicySpec) -> Observation:
        """Validate an infer payload against the spec; errors name the key and what was wrong."""
        instruction = payload.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("observation.instruction must be a non-empty string")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise ValueError(
                f"observation.instruction is {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}"
            )
        images = payload.get("images")
        if not isinstance(images, dict):
            raise ValueError(f"observation.images must be a dict with keys {sorted(spec.image_keys)}")
        missing = sorted(set(spec.image_keys) - set(images))
        if missing:
            raise ValueError(f"observation.images is missing {missing} (expected {sorted(spec.image_keys)})")
        checked = {}
        for key, shape in spec.image_keys.items():
            img = images[key]
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != tuple(shape):
                got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ValueError(f"observation.images.{key} must be uint8{list(shape)}, got {got}")
            checked[key] = img
        state = payload.get("state")
        if spec.state_dim is not None:
            if not isinstance(state, np.ndarray) or state.shape != (spec.state_dim,):
                got = list(state.shape) if isinstance(state, np.ndarray) else type(state).__name__
                raise ValueError(
                    f"observation.state must be a float array of shape [{spec.state_dim}], got {got}"
                )
            if not np.all(np.isfinite(state)):
                raise ValueError("observation.state contains NaN or inf")
            state = state.astype(np.float32)
        return cls(instruction, checked, state)


@dataclass
class ActionChunk:
    """`actions` [chunk_length, action_dim] float32; `activations` name -> array, only what was asked."""

    actions: np.ndarray
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Policy(abc.ABC):
    """A VLA policy the node can serve and steer."""

    spec: PolicySpec

    @property
    @abc.abstractmethod
    def backbone(self) -> Backbone:
        """The steerable, vocabulary-projectable language backbone."""

    @property
    def backbones(self) -> dict[str, Backbone]:
        """Every steerable stack by name: "language" is `backbone`; pi0 adds "action_expert"."""
        return {"language": self.backbone}

    @abc.abstractmethod
    def infer(self, obs: Observation) -> ActionChunk:
        """One inference: an action chunk for the observation. Must not keep references to `obs` arrays."""

    def reset(self) -> None:  # noqa: B027 - stateless policies have nothing to reset
        """A new episode starts."""
