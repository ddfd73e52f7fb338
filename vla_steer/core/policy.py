"""The policy interface: what the policy node serves and steers.

A policy turns an observation (the wire's `Observation`: camera images, optional proprioceptive state, a
language instruction, validated against the policy's spec by the node) into an action chunk, and exposes
its steerable backbone (gated MLPs, unembedding, tokenizer) so discovery and the Steerer can work on it
without knowing which VLA it is.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_steer.core.backbone import Backbone
from vla_steer.wire import Observation


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
    # What inputs and outputs mean (gripper range, action frame, image preprocessing), announced in the
    # hello reply so a simulator can refuse a setup that contradicts them: keys in `wire.ServerInfo`.
    conventions: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActionChunk:
    """`actions` [chunk_length, action_dim] float32; `activations` name -> array, only what was asked."""

    actions: np.ndarray
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Policy(abc.ABC):
    """A VLA policy the node can serve and steer.

    Batching: a policy with `batching = True` implements `infer_batch`, one forward for several
    observations with equal `batch_key`s (sample i of every forward is observation i, so the Steerer's
    per-sample rows line up); the node groups concurrent requests by key (e.g. prompt length: rows batch
    unpadded, so each computes what it computes alone). Others are served one request at a time.
    Episodes: `new_episode()` is one client's per-episode state (pi0: its seeded noise generator), made at
    that client's reset and passed back with its observations, so clients sharing a node (and a batch)
    keep their own episodes.
    """

    spec: PolicySpec
    batching: bool = False

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
        """A new episode starts (for clients that keep no episode of their own, see `new_episode`)."""

    def new_episode(self) -> Any:
        """A new episode's per-client state; None when the policy keeps none."""
        return None

    def batch_key(self, obs: Observation) -> Any:
        """Observations with equal keys can share a forward (`batching` policies)."""
        return None

    def infer_batch(self, observations: Sequence[Observation], episodes: Sequence[Any]) -> list[ActionChunk]:
        """One action chunk per observation (all of one `batch_key`), from one batched forward (`batching`
        policies only). `episodes[i]` is observation i's client's `new_episode()` state, or None (shared)."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")
