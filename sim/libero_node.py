"""The LIBERO sim node: run LIBERO episodes against a policy node and record them. Runs in `.venv-libero`.

    .venv-libero/bin/python -m sim.libero_node --env libero_spatial \
        --server tcp://127.0.0.1:5555 --episodes 10 --out runs/libero_spatial [--steer fast=4]
    .venv-libero/bin/python -m sim.libero_node --env openvla_libero --suite libero_10 --task-id 3 \
        --episodes 50 --out runs/openvla_libero_10      # an evaluation profile (configs/profiles)

The counterpart of `vla-steer sim` for LIBERO, which cannot live in the main venv (robosuite 1.4): the same
run setup (`sim.session`), which imports only torch-free modules (vla_steer.wire, vla_steer.core.rollouts,
sim.*) and LIBERO. Every executed step goes into the rollout store at --out (appended to), with the config's
conventions in each episode's metadata; a summary table is printed at the end. Exit codes: 0 done,
2 bad arguments or config, 3 no policy node, 4 an episode failed (what was recorded so far is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sim import session
from sim.libero_env import load_libero_config
from vla_steer.wire import parse_strengths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.libero_node",
        description="Connect to a running policy node (`vla-steer serve`), run episodes of one LIBERO task, "
        "record every step into a rollout store, and print a summary. Runs in the LIBERO venv "
        "(scripts/make_libero_venv.sh).",
    )
    p.add_argument(
        "--env",
        required=True,
        help="LIBERO sim config: a YAML file, or the name of a shipped one (libero_spatial, libero_10, ...), "
        "or an evaluation profile (openvla_libero, openpi_pi0_libero, ...; then --suite is needed)",
    )
    p.add_argument("--profile", help="an evaluation profile to run the sim config under (configs/profiles)")
    p.add_argument("--suite", help="the LIBERO suite (instead of the config's)")
    p.add_argument("--task-id", type=int, help="the task's index in the suite (instead of the config's)")
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy node's address")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="executed steps per episode (default: the suite's limit)")
    p.add_argument(
        "--execute-steps",
        type=int,
        help="actions executed per chunk before re-planning (default: the config's or profile's, else all)",
    )
    p.add_argument(
        "--steer",
        nargs="*",
        default=[],
        metavar="NAME=STRENGTH",
        help="the setting every inference runs under (other knobs off)",
    )
    p.add_argument(
        "--activations", default="", help="comma-separated concepts or layer:N to record with every step"
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the policy node")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for one reply from the node (default 5; a 7B model on a CPU needs more)",
    )
    p.add_argument("--out", type=Path, required=True, help="rollout store directory (appended to)")
    p.add_argument(
        "--seed",
        type=int,
        help="episode i is seeded seed+i and starts from init state (seed+i) %% 50 "
        "(default: the config's first_seed, 0; LeRobot's profiles 1000)",
    )
    g = p.add_argument_group("CURVE encryption (see `vla-steer keys`)")
    g.add_argument("--server-key", type=Path, help="the server's public .key file")
    g.add_argument("--keypair", type=Path, help="this client's .key_secret file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.timeout <= 0:
            raise ValueError(f"--timeout {args.timeout}: must be positive seconds")
        cfg = load_libero_config(args.env, profile=args.profile, suite=args.suite, task_id=args.task_id)
        # Flags are recorded as the config's, so the episode's conventions say what ran.
        for key, value in (("max_steps", args.max_steps), ("execute_steps", args.execute_steps)):
            if value is not None:
                cfg = cfg.model_copy(update={key: value})
        label = Path(args.env).stem  # episode names: the config's, or profile-suite-task
        if cfg.profile or args.suite or args.task_id is not None:
            label = "-".join(str(x) for x in (cfg.profile, cfg.suite, cfg.task_id) if x is not None)
        code, _ = session.run_command(
            args.server, {label: cfg}, [parse_strengths(args.steer)], out=args.out, episodes=args.episodes,
            max_steps=cfg.step_limit(), seed=cfg.first_seed if args.seed is None else args.seed,
            execute_steps=cfg.execute_steps,
            activations=session.names(args.activations), server_key=args.server_key, keypair=args.keypair,
            connect_timeout=args.connect_timeout, request_timeout=args.timeout,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
