"""The runner's callbacks that write every episode into a rollout store as it happens.

One writer per episode: the sim node steps the world, so it records. Knob changes the runner sees (the
steering state in a reply differs from the previous one) are also logged as timestamped events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sim.runner import EpisodeSummary
from vla_steer.core.rollouts import EpisodeWriter, Recorder


class EpisodeRecorder:
    """`run_episodes(..., on_step=rec.on_step, on_episode_end=rec.on_episode_end)`."""

    def __init__(self, recorder: Recorder, meta: Mapping[str, Any]):
        self.recorder = recorder
        self.meta = dict(meta)  # task, policy, conventions, ...: the same for every episode of the run
        self._writer: EpisodeWriter | None = None
        self._episode: str | None = None
        self._steering: dict | None = None
        self.episode_ids: list[str] = []

    def on_step(self, record: dict[str, Any]) -> None:
        if record["episode"] != self._episode:
            self._close(None)
            self._episode = record["episode"]
            meta = self.meta | {"episode": record["episode"], "instruction": record["instruction"]}
            self._writer = self.recorder.start_episode(meta)
            self.episode_ids.append(self._writer.id)
            self._steering = None
        if record["steering"] != self._steering:
            self._writer.event("steering", state=record["steering"])
            self._steering = record["steering"]
        activations = {k: np.asarray(v, dtype=np.float32) for k, v in record["activations"].items()}
        self._writer.step(
            images=record["images"],
            state=record["state"],
            ee_pos=record["ee_pos"],
            ee_quat=record["ee_quat"],
            ee_vel=record["ee_vel"],
            action_chunk=record["action_chunk"],
            action=record["action"],
            reward=float(record["reward"]),
            t_wall=record["t_wall"],
            t_sim=record["t_sim"],
            steering=record["steering"],
            activations=activations or None,
        )

    def on_episode_end(self, summary: EpisodeSummary) -> None:
        self._close(summary)

    def _close(self, summary: EpisodeSummary | None) -> None:
        if self._writer is None:
            return
        if summary is not None and summary.error is not None:
            self._writer.event("error", message=summary.error)
            self._writer.abort(summary.error)
        else:
            self._writer.end(
                success=None if summary is None else summary.success,
                seed=None if summary is None else summary.seed,
                length=self._writer.n_steps,
            )
        self._writer, self._episode = None, None
