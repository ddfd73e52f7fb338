"""`vla-steer analyze`: metrics, dose-response, probes and an HTML report for a rollout store."""

from __future__ import annotations

from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="metrics, dose-response, activation probes and an HTML report for a rollout store",
        description="Analyse RUN_DIR (a rollout store, or a directory holding rollouts/ and directions/): "
        "per-setting metrics with bootstrap CIs, changes vs baseline over matched seeds, random-neuron "
        "controls, neurons tracking speed/height, figures. Writes report.html and summary.json.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--out", type=Path, default=None, help="where report.html and summary.json go (default: RUN_DIR)"
    )
    p.add_argument(
        "--directions", type=Path, default=None, help="directions directory (default: RUN_DIR/directions)"
    )
    p.add_argument("--control-hz", type=float, default=None, help="control rate, for time axes in seconds")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from vla_steer.core.analysis import analyze
    from vla_steer.core.discovery.direction import load_directions

    if not args.run_dir.exists():
        raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
    directions = load_directions(args.directions) if args.directions is not None else None
    a = analyze(args.run_dir, directions=directions, out=args.out, control_hz=args.control_hz, progress=print)
    out = args.out or args.run_dir
    print(
        f"{len(a.episodes)} episodes in {len(a.settings)} settings -> {out / 'report.html'}, {out / 'summary.json'}"
    )
    return 0
