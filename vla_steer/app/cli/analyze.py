"""`vla-steer analyze`: metrics, dose-response, probes and an HTML report for a rollout store."""

from __future__ import annotations

from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="metrics, dose-response, activation probes and an HTML report for a rollout store",
        description="Analyse RUN_DIR (a rollout store, or a directory holding rollouts/ and directions/): "
        "per-setting metrics with bootstrap CIs, changes vs baseline over matched seeds, random-neuron "
        "controls, neurons tracking speed/height, figures. Writes report.html and summary.json. Several "
        "RUN_DIRs (the shards of `vla-steer eval --shard`) are read as one run; an episode recorded in two "
        "of them (same task, setting and seed) counts once.",
    )
    p.add_argument("run_dir", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.html and summary.json go (default: RUN_DIR; required with several)",
    )
    p.add_argument(
        "--directions", type=Path, default=None, help="directions directory (default: RUN_DIR/directions)"
    )
    p.add_argument("--control-hz", type=float, default=None, help="control rate, for time axes in seconds")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from vla_steer.core.analysis import analyze
    from vla_steer.core.discovery.direction import load_directions

    for run_dir in args.run_dir:
        if not run_dir.exists():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if len(args.run_dir) > 1 and args.out is None:
        raise ValueError("several RUN_DIRs are analysed into one report: give --out DIR")
    directions = load_directions(args.directions) if args.directions is not None else None
    a = analyze(args.run_dir, directions=directions, out=args.out, control_hz=args.control_hz, progress=print)
    out = args.out or args.run_dir[0]
    print(
        f"{len(a.episodes)} episodes in {len(a.settings)} settings -> {out / 'report.html'}, {out / 'summary.json'}"
    )
    return 0
