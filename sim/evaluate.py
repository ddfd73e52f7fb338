"""A steering evaluation over one environment: steering settings x seeded episodes, recorded and summarised.

Every inference carries its setting (per-request steering: exactly those knobs on, every other off), so
settings never leak into each other and the node's live knobs are left alone: several evaluations with
different settings share one node (`sim.worker`). The same seeds are used for every setting, so baseline
and steered episodes start from the same initial states. `sim.session`
runs it for each task of a run; this is the one place the sim records episodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sim.base import SimEnv
from sim.runner import EpisodeError, EpisodeSummary, run_episodes
from vla_steer.core.rollouts import EpisodeRecorder, Recorder
from vla_steer.wire import Client
from vla_steer.wire.messages import SETPOINT


@dataclass
class SettingResult:
    task: str
    setting: str  # "off" or "fast=4,up=2"
    episodes: int
    success_rate: float
    mean_length: float
    mean_ee_speed: float
    mean_ee_height: float
    episode_ids: list[str]


class EvaluationError(RuntimeError):
    """An episode failed. `results` holds every cell so far, the failed one (its episodes until then) last."""

    def __init__(self, message: str, results: list[SettingResult]):
        super().__init__(message)
        self.results = results


def setting_label(setting: Mapping[str, float]) -> str:
    """'fast=4,up=2', 'speed@0.1' (a setpoint), or 'off'."""
    return (
        ",".join(f"{k}{v:g}" if k.endswith(SETPOINT) else f"{k}={v:g}" for k, v in setting.items()) or "off"
    )


def evaluate(
    client: Client,
    env: SimEnv,
    settings: Sequence[Mapping[str, float]],
    *,
    task: str,
    episodes: int,
    max_steps: int,
    recorder: Recorder,
    meta: Mapping[str, object] | None = None,
    seed: int = 0,
    execute_steps: int | None = None,
    activations: Sequence[str] | None = None,
    settle: int = 0,
    progress: Callable[[str], None] = print,
) -> list[SettingResult]:
    """Run every setting on `env` (labelled `task`); `meta` goes into every episode's record."""
    results: list[SettingResult] = []
    for setting in settings:
        label = setting_label(setting)
        progress(f"{task} [{label}]: {episodes} episodes")
        episode_meta = {
            **(meta or {}),
            "task_label": task,
            "setting": dict(setting),
            "setting_label": label,
        }
        rec = EpisodeRecorder(recorder, episode_meta)
        try:
            summaries = run_episodes(
                client, env, episodes, max_steps, execute_steps=execute_steps, recorder=rec,
                steer=dict(setting), activations=activations,
                seed=seed, episode_prefix=f"{task}-{label}", settle=settle,
            )  # fmt: skip
        except EpisodeError as e:
            results.append(_aggregate(task, label, e.summaries, rec.episode_ids))
            raise EvaluationError(str(e), results) from e
        results.append(_aggregate(task, label, summaries, rec.episode_ids))
    return results


def _aggregate(task: str, label: str, summaries: list[EpisodeSummary], ids: list[str]) -> SettingResult:
    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return SettingResult(
        task=task,
        setting=label,
        episodes=len(summaries),
        success_rate=mean([float(s.success) for s in summaries]),
        mean_length=mean([float(s.length) for s in summaries]),
        mean_ee_speed=mean([s.mean_ee_speed for s in summaries]),
        mean_ee_height=mean([s.mean_ee_height for s in summaries]),
        episode_ids=ids,
    )


def format_results(results: Sequence[SettingResult]) -> str:
    """The results table, then the success rate over all episodes."""
    lines = [
        f"{'task':<16} {'setting':<18} {'n':>3} {'success':>8} {'steps':>6} {'speed m/s':>10} {'height m':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.task:<16} {r.setting:<18} {r.episodes:>3} {r.success_rate:>8.0%} {r.mean_length:>6.1f} "
            f"{r.mean_ee_speed:>10.4f} {r.mean_ee_height:>9.3f}"
        )
    total = sum(r.episodes for r in results)
    rate = sum(r.success_rate * r.episodes for r in results if r.episodes) / max(1, total)
    lines.append(f"success rate {rate:.0%} over {total} episodes")
    return "\n".join(lines)
