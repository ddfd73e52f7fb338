"""Simulator nodes: environments that are clients of the policy node, the episode runner, and runs.

`sim.session` sets up a run once for every caller (connect, build the environments from their configs,
run steering settings over seeded episodes, record, summarise); `sim.runner` is simulator-agnostic (it drives
anything with `reset`/`step`/`success`); environment adapters import their simulator lazily, so `import sim`
works where robosuite is not installed.

    from sim import load_sim_config, session
    results = session.run("tcp://127.0.0.1:5555", {"lift": load_sim_config("robosuite_lift")},
                          [{}, {"fast": 4.0}], out=Path("runs/lift"), episodes=5, max_steps=200)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sim.base import SimEnv, SimObservation, StepResult
from sim.runner import (
    BadActionError,
    EpisodeError,
    EpisodeSummary,
    PolicyNodeDied,
    run_episodes,
)

if TYPE_CHECKING:
    from sim.robosuite_env import RobosuiteConfig, RobosuiteEnv, load_sim_config

__all__ = [
    "BadActionError",
    "EpisodeError",
    "EpisodeSummary",
    "PolicyNodeDied",
    "RobosuiteConfig",
    "RobosuiteEnv",
    "SimEnv",
    "SimObservation",
    "StepResult",
    "load_sim_config",
    "run_episodes",
]

_LAZY = {"RobosuiteConfig", "RobosuiteEnv", "load_sim_config"}


def __getattr__(name: str) -> Any:
    # The robosuite adapter imports mujoco/robosuite only when an env is built, but keep even its
    # module out of `import sim` so the runner stays usable from a LIBERO or robot environment.
    if name in _LAZY:
        from sim import robosuite_env

        return getattr(robosuite_env, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
