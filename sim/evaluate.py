"""A steering evaluation grid: tasks x steering settings x seeded episodes, recorded and summarised.

Every setting starts from all knobs off, so settings never leak into each other; the same seeds are used
for every setting of a task, so baseline and steered episodes start from the same initial states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sim.base import SimEnv
from sim.runner import EpisodeSummary, run_episodes
from vla_steer.core.rollouts import EpisodeRecorder, Recorder
from vla_steer.wire import Client


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


def setting_label(setting: Mapping[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in setting.items()) or "off"


def evaluate(
    client: Client,
    tasks: Mapping[str, Callable[[], SimEnv]],
    settings: Sequence[Mapping[str, float]],
    *,
    episodes: int,
    max_steps: int,
    recorder: Recorder,
    meta: Mapping[str, object] | None = None,
    task_meta: Mapping[str, Mapping[str, object]] | None = None,
    seed: int = 0,
    execute_steps: int | None = None,
    activations: Sequence[str] | None = None,
    settle: int = 0,
    progress: Callable[[str], None] = print,
) -> list[SettingResult]:
    """Run every (task, setting) cell; `tasks` maps a task label to a function building its env, and
    `task_meta` adds per-task metadata (conventions, config) to its episodes' records."""
    results = []
    for task, make_env in tasks.items():
        env = make_env()
        try:
            for setting in settings:
                label = setting_label(setting)
                progress(f"{task} [{label}]: {episodes} episodes")
                client.knobs_off()
                episode_meta = {**(meta or {}), **(task_meta or {}).get(task, {}), "task_label": task}
                rec = EpisodeRecorder(
                    recorder, episode_meta | {"setting": dict(setting), "setting_label": label}
                )
                summaries = run_episodes(
                    client, env, episodes, max_steps, execute_steps=execute_steps, recorder=rec,
                    steer=dict(setting) or None, activations=activations,
                    seed=seed, episode_prefix=f"{task}-{label}", settle=settle,
                )  # fmt: skip
                results.append(_aggregate(task, label, summaries, rec.episode_ids))
        finally:
            client.knobs_off()
            close = getattr(env, "close", None)
            if close is not None:
                close()
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
    lines = [
        f"{'task':<16} {'setting':<18} {'n':>3} {'success':>8} {'steps':>6} {'speed m/s':>10} {'height m':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.task:<16} {r.setting:<18} {r.episodes:>3} {r.success_rate:>8.0%} {r.mean_length:>6.1f} "
            f"{r.mean_ee_speed:>10.4f} {r.mean_ee_height:>9.3f}"
        )
    return "\n".join(lines)
