"""`vla-steer view`: scrub through recorded rollouts in the rerun viewer, or write them to an .rrd file."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "view",
        help="show rollouts in the rerun viewer (camera frames, end-effector path, actions, steering, activations)",
        description="Stream the episodes of RUN_DIR (a rollout store, or a run directory holding rollouts/) "
        "into rerun: a viewer it opens, or an .rrd file with --save (open it later with `rerun FILE.rrd`). "
        "Needs rerun-sdk: pip install 'vla-steer[viewer]'. "
        "Example: vla-steer view runs/lift --episode 000003-1a2b3c4d --save lift.rrd",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--episode",
        action="append",
        metavar="ID",
        help="an episode id to show (repeatable; default: every one)",
    )
    p.add_argument(
        "--save", type=Path, metavar="FILE.rrd", help="write an .rrd file instead of opening a viewer"
    )
    p.add_argument(
        "--connect", action="store_true", help="send to a rerun viewer already running instead of opening one"
    )
    p.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    from vla_steer.core.rollouts import open_store
    from vla_steer.core.rollouts.viewer import log_store

    root = args.run_dir / "rollouts" if (args.run_dir / "rollouts").is_dir() else args.run_dir
    store = open_store(root)  # FileNotFoundError names the directory
    known = store.episode_ids()
    ids = args.episode or known
    unknown = [i for i in ids if i not in known]
    if unknown:
        listed = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise ValueError(f"--episode {unknown[0]}: no such episode in {root} (it has {len(known)}: {listed})")
    if not ids:
        raise ValueError(f"the rollout store {root} holds no episodes")
    if args.save is not None and args.save.suffix != ".rrd":
        raise ValueError(f"--save {args.save}: rerun files end in .rrd")
    try:
        sent = log_store(store, ids, save=args.save, spawn=not args.connect)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = args.save or ("the running rerun viewer" if args.connect else "a rerun viewer")
    print(f"{len(sent)} episodes of {root} -> {where}")
    return 0
