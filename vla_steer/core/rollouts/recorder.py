"""The one episode recorder of every node that steps a world (the sim runner, the robot node): Steps in.

An episode opens with its first step, so a run that never steps records nothing, and closes with `end` or
`abort`. The steering state the policy reports with each step is logged as a "steering" event whenever it
differs from the previous step's in the episode (so at an episode's first step, when there is one). Events
that arrive while no episode is open (a knob turned while the arm is stopped) are kept with the time they
happened and written when the next episode opens. Thread-safe: the robot records from its inference
thread, ends episodes from a watcher thread and takes events from its control socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vla_steer.core.rollouts.episode import EpisodeInfo
from vla_steer.core.rollouts.format import CONVENTIONS, SchemaError, plain
from vla_steer.core.rollouts.writer import EpisodeWriter, Recorder

if TYPE_CHECKING:  # a type only: the store imports without the wire's sockets (the LIBERO venv writes it)
    from vla_steer.wire.messages import Step

MAX_PENDING_EVENTS = 1000  # kept between episodes; beyond this a stopped node drops them


@dataclass(frozen=True)
class Event:
    """An event to record: `kind` ("knobs", "stop", ...), plain-value `data`, wall time `t` (None: now)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    t: float | None = None


class EpisodeRecorder:
    """Records `Step`s into episodes of a store, one episode open at a time.

    `meta` goes into every episode's metadata, with the instruction of its first step and the
    `episode_meta` given with that step.
    """

    def __init__(self, recorder: Recorder, meta: Mapping[str, Any] | None = None):
        self.recorder = recorder
        self.meta = dict(meta or {})
        self.episode_ids: list[str] = []  # every episode this recorder opened, in order
        self._writer: EpisodeWriter | None = None
        self._steering: Any = None
        self._pending: list[Event] = []
        self._lock = threading.Lock()

    @property
    def episode_id(self) -> str | None:
        """The open episode's id, None between episodes."""
        writer = self._writer
        return None if writer is None else writer.id

    def step(self, step: Step, **episode_meta: Any) -> int:
        """Record one executed step and return its index in its episode; the first step after none was
        open opens an episode (with `episode_meta` added to its metadata)."""
        obs = step.observation
        activations = {k: np.asarray(v, dtype=np.float32) for k, v in step.activations.items()}
        with self._lock:
            if self._writer is None:
                self._open({**self.meta, "instruction": obs.instruction, **episode_meta})
            writer = self._writer
            if step.steering != self._steering:
                writer.event("steering", state=step.steering)
                self._steering = step.steering
            return writer.step(
                images=obs.images,
                state=obs.state,
                ee_pos=step.ee_pos,
                ee_quat=step.ee_quat,
                ee_vel=step.ee_vel,
                action_chunk=step.action_chunk,
                action=step.action,
                reward=step.reward,
                t_wall=step.t_wall,
                t_sim=step.t_sim,
                steering=step.steering,
                activations=activations or None,
                policy_info=_scalars(step.policy_info),
            )

    def event(self, kind: str, *, t: float | None = None, **data: Any) -> None:
        """Record an event in the open episode, or keep it (stamped now unless `t` is given) for the next.
        Bad values raise SchemaError here, in the caller's thread, either way."""
        with self._lock:
            if self._writer is not None:
                self._writer.event(kind, t=t, **data)
                return
            if not isinstance(kind, str) or not kind:
                raise SchemaError("kind", f"an event kind must be a non-empty str, got {kind!r}")
            if len(self._pending) < MAX_PENDING_EVENTS:
                self._pending.append(
                    Event(kind, plain(data, f"event[{kind!r}]"), time.time() if t is None else t)
                )

    def end(
        self, success: bool | None = None, *, event: Event | None = None, **final_meta: Any
    ) -> EpisodeInfo | None:
        """End the open episode (`event` first, if given; `final_meta` merged into its metadata). Nothing
        to do, and None, when no episode is open."""
        with self._lock:
            writer = self._take(event)
            return None if writer is None else writer.end(success, **final_meta)

    def abort(self, reason: str, *, event: Event | None = None) -> None:
        """Close the open episode incomplete, as a crash would leave it (`event` first, if given)."""
        with self._lock:
            writer = self._take(event)
            if writer is not None:
                writer.abort(reason)

    def _open(self, meta: dict[str, Any]) -> None:
        conventions = {**(meta.get("conventions") or {}), **CONVENTIONS}  # the writer's (gripper, ...) kept
        self._writer = self.recorder.start_episode({**meta, "conventions": conventions})
        self.episode_ids.append(self._writer.id)
        self._steering = None
        pending, self._pending = self._pending, []
        for ev in pending:  # what changed between episodes, as it happened
            self._writer.event(ev.kind, t=ev.t, **ev.data)

    def _take(self, event: Event | None) -> EpisodeWriter | None:
        """The open writer, now no longer open here, with `event` written to it."""
        writer, self._writer = self._writer, None
        if writer is not None and event is not None:
            writer.event(event.kind, t=event.t, **event.data)
        return writer


MAX_INFO_TEXT = 256  # characters: a plan is a few words; a longer text is not recorded with every step


def _scalars(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scalar entries of a policy's reply info (a plan, a latency): what a step records of it. Lists,
    arrays and nested values (action token ids, per-policy extras), texts over MAX_INFO_TEXT and integers
    msgpack cannot hold are left out, so no policy's extras can fail a recording or bloat it."""
    kept = {}
    for k, v in (info or {}).items():
        if isinstance(v, (np.bool_, np.number, np.str_)):
            v = v.item()
        if not isinstance(k, str) or k == "steering" or not isinstance(v, (bool, int, float, str)):
            continue
        if (isinstance(v, str) and len(v) > MAX_INFO_TEXT) or (type(v) is int and not -(2**63) <= v < 2**64):
            continue
        kept[k] = v
    return kept or None
