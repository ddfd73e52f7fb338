"""`vla-steer export-lerobot`: a rollout store as a LeRobot v3.0 dataset, with this project's own data."""

from __future__ import annotations

from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export-lerobot",
        help="export a rollout store as a LeRobot v3.0 dataset",
        description="Write STORE's complete episodes to OUT (absent or empty) as a LeRobot v3.0 dataset: "
        "state, action, reward, done, success, one mp4 per camera, plus per step the steering state "
        "(steering.strength and steering.enabled, one entry per concept) and every recorded activation "
        "(activations.<name>, forwards x neurons flattened). Example: vla-steer export-lerobot runs/lift lerobot_lift",
    )
    p.add_argument("store", type=Path, help="rollout store directory (what `vla-steer sim --out` wrote)")
    p.add_argument("out", type=Path, help="dataset directory to create (absent or empty)")
    p.add_argument("--fps", type=int, help="frames per second (default: the episodes' recorded control_freq)")
    p.add_argument(
        "--skip-damaged",
        action="store_true",
        help="leave out episodes whose log is damaged (default: refuse; see `vla-steer store check`)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import json

    from vla_steer.core.rollouts import export_lerobot, open_store

    if not args.store.is_dir():
        raise FileNotFoundError(f"STORE {args.store}: no such rollout store directory")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"OUT {args.out}: exists and is not an empty directory; choose a new one")
    store = open_store(args.store)
    fps = args.fps if args.fps is not None else _recorded_fps(store)
    if fps <= 0:
        raise ValueError(f"--fps {fps}: must be a positive integer")
    out = export_lerobot(store, args.out, fps=fps, skip_damaged=args.skip_damaged)
    info = json.loads((out / "meta" / "info.json").read_text())
    extra = [k for k in info["features"] if k.startswith(("steering.", "activations."))]
    print(f"exported {info['total_episodes']} episodes, {info['total_frames']} frames at {fps} fps to {out}/")
    print(f"features beside LeRobot's: {', '.join(extra) or 'none'}")
    return 0


def _recorded_fps(store) -> int:
    episodes = [i for i in store.episodes() if i.complete and i.n_steps > 0]
    if not episodes:
        raise ValueError("STORE has no complete episodes with steps to export")
    meta = store.load(episodes[0].id, images=False, activations=False).meta
    hz = (meta.get("conventions") or {}).get("control_freq")
    if not isinstance(hz, (int, float)) or hz <= 0 or hz != int(hz):
        raise ValueError(f"the episodes record no whole-number control_freq ({hz!r}); pass --fps")
    return int(hz)
