"""`vla-steer demo` (the whole method on the bundled demo VLA) and `vla-steer train-demo` (reproduce it)."""

from __future__ import annotations

from pathlib import Path

from vla_steer.app.cli.args import parse_floats
from vla_steer.app.demo.defaults import CONTROLS, EPISODES, FULL, STRENGTHS, WORKERS, floats


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole method on the bundled demo VLA: discovery, steered robosuite episodes, report",
        description="Discover the demo VLA's fast/slow/up/down neurons, run baseline, steered and "
        "random-neuron control episodes on robosuite Lift (policy node + sim node over ZeroMQ), record them, "
        "and write an analysis report (OUT/report.html, OUT/summary.json).",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="run directory (default: demo_out)")
    p.add_argument(
        "--episodes",
        type=int,
        default=None,
        help=f"episodes per setting (default: {EPISODES}; --full: {FULL['episodes']})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=WORKERS,
        help=f"robosuite processes sharing the policy node (default: {WORKERS})",
    )
    p.add_argument(
        "--strengths",
        default=None,
        help="clamp values for each direction, comma-separated; the largest is the reported strength, where "
        f"the controls run (default: {floats(STRENGTHS)}; --full: {floats(FULL['strengths'])})",
    )
    p.add_argument(
        "--controls",
        type=int,
        default=None,
        help="random-control draws per direction, each matched to the direction's neurons in layer, sign, "
        f"coefficient statistics and value-vector norm (default: {CONTROLS}; --full: {FULL['controls']})",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the thorough study: more strengths, episodes and control draws, controls at every strength "
        "(about 1.5 h on 2 cores)",
    )
    p.add_argument(
        "--positions",
        choices=("all", "last", "plan"),
        default="plan",
        help="where the concept neurons are steered: only the forwards that decide the demo VLA's plan words, "
        "its action tokens then following the steered plan (default: plan); every token position (all, the "
        "paper's setting); or the last position of each forward (last)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a claim of the demo is not met")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a demo VLA checkpoint (default: the bundled one, shipped config demo_vla)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train-demo",
        help="reproduce the bundled demo VLA: scripted robosuite demonstrations, then training",
        description="Generate scripted Lift demonstrations at every speed and carrying height (robosuite, "
        "headless), then train the demo VLA on them, co-trained on language. Seeded.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_vla"), help="checkpoint directory (default: demo_vla)"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="reuse demonstrations (.npz) instead of generating"
    )
    p.add_argument(
        "--episodes-per-setting", type=int, default=48, help="demonstrations per speed x height (default: 48)"
    )
    p.add_argument(
        "--ur5e-per-setting", type=int, default=16,
        help="demonstrations per speed x height on the UR5e, the robot node's twin (default: 16; 0: none)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=3500, help="training steps (default: 3500)")
    p.add_argument("--workers", type=int, default=2, help="processes generating demonstrations")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_demo)


def cmd_demo(args) -> int:
    import shlex
    import sys

    from vla_steer.app.demo.run import run_demo

    strengths = parse_floats(args.strengths, "--strengths") if args.strengths else None
    strengths = tuple(strengths or (FULL["strengths"] if args.full else STRENGTHS))
    episodes = args.episodes if args.episodes is not None else (FULL["episodes"] if args.full else EPISODES)
    controls = args.controls if args.controls is not None else (FULL["controls"] if args.full else CONTROLS)
    if episodes < 2 or not 1 <= args.workers <= 32 or controls < 1:
        raise ValueError("--episodes must be >= 2 (a CI needs two), --workers 1..32 and --controls >= 1")
    if any(s <= 0 for s in strengths) or len(set(strengths)) != len(strengths):  # (finite: parse_floats)
        raise ValueError(f"--strengths must be distinct, positive clamp values, got {args.strengths}")
    if args.weights is not None and not args.weights.is_dir():
        raise FileNotFoundError(f"--weights {args.weights} is not a directory")
    if args.weights is not None and args.positions == "plan":
        from policies.resolve import resolve_policy, says_plan

        if not says_plan(resolve_policy(str(args.weights), flag="--weights")):
            raise ValueError(
                f"--positions plan steers the plan words, and --weights {args.weights} is not a demo VLA that says "
                "a plan before its actions: use --positions all or last"
            )
    demo = run_demo(
        args.out, episodes=episodes, workers=args.workers, strengths=strengths, controls=controls,
        full=args.full, weights=args.weights, seed=args.seed, positions=args.positions,
        command=shlex.join(["vla-steer", *sys.argv[1:]]),
    )  # fmt: skip
    return 1 if args.strict and not demo["all_held"] else 0


def cmd_train_demo(args) -> int:
    if args.episodes_per_setting < 1 or args.ur5e_per_setting < 0 or args.steps < 1:
        raise ValueError(
            "--episodes-per-setting and --steps must be at least 1, --ur5e-per-setting at least 0; got "
            f"{args.episodes_per_setting}, {args.steps}, {args.ur5e_per_setting}"
        )
    import os
    import time

    import numpy as np
    import torch

    from vla_steer.app.demo.data import KEYS, TRAIN_SEEDS, generate
    from vla_steer.app.demo.train import train

    t0 = time.perf_counter()
    data = args.data
    if data is None:
        data = args.out.with_name(args.out.name + "_demonstrations.npz")
        robots = {"Panda": args.episodes_per_setting, "UR5e": args.ur5e_per_setting}
        robots = {robot: n for robot, n in robots.items() if n}
        print(
            f"generating {9 * sum(robots.values())} scripted demonstrations ({robots} per setting) -> {data}"
        )
        # Seeds from TRAIN_SEEDS: the demo evaluates seeds 0, 1, ..., which no demonstration may share.
        generate(data, seed=TRAIN_SEEDS + args.seed, workers=args.workers, robots=robots)
        kept = len(np.unique(np.load(data)["episode"]))
        print(
            f"   {kept} kept (an episode whose expert dropped the cube is not), {time.perf_counter() - t0:.0f} s"
        )
    elif not data.is_file():
        raise FileNotFoundError(f"--data {data} does not exist")
    else:
        missing = [k for k in KEYS if k not in np.load(data).files]
        if missing:
            raise ValueError(
                f"--data {data} has no {', '.join(missing)} (demonstrations from an older train-demo?): "
                "generate them anew by leaving out --data"
            )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train(data, args.out, steps=args.steps, seed=args.seed)
    print(f"saved the demo VLA to {args.out} ({(time.perf_counter() - t0) / 60:.1f} min in all)")
    return 0
