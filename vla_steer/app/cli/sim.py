"""`vla-steer sim` (episodes against a policy node, recorded) and `vla-steer eval` (a grid of settings)."""

from __future__ import annotations

from pathlib import Path

from vla_steer.app.cli.args import add_run_options, config_path

ENV_HELP = (
    "robosuite sim config: a YAML file, or the name of a shipped one (robosuite_lift, robosuite_stack, ...)"
)
EXIT_CODES = "Exit codes: 0 done, 2 bad arguments, 3 no policy node, 4 an episode failed (what ran is kept)."


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sim",
        help="run simulated episodes against a policy node and record them",
        description="Connect to a running policy node (`vla-steer serve`), run episodes in a simulator, record "
        "every step into a rollout store, and print a summary. Example: vla-steer sim --env robosuite_lift "
        f"--episodes 5 --out runs/lift --steer fast=4. {EXIT_CODES}",
    )
    p.add_argument("--env", type=config_path("sims"), required=True, help=ENV_HELP)
    p.add_argument(
        "--steer", nargs="*", default=[], metavar="NAME=STRENGTH", help="knobs to set (others off)"
    )
    add_run_options(p)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser(
        "eval",
        help="a grid of tasks x steering settings x seeded episodes, recorded and summarised",
        description="Every setting starts from all knobs off and uses the same seeds, so baseline and steered "
        "episodes start alike. Example: vla-steer eval --env robosuite_lift --settings off fast=4 fast=8 "
        f"slow=4 --episodes 10 --out runs/grid. {EXIT_CODES}",
    )
    p.add_argument(
        "--env",
        type=config_path("sims"),
        action="append",
        required=True,
        help=f"{ENV_HELP}; repeat for several",
    )
    p.add_argument("--settings", nargs="+", default=["off"], help="off, or NAME=S[,NAME=S...] per setting")
    add_run_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_sim(args) -> int:
    from vla_steer.wire import parse_strengths

    return run_grid(args, [args.env], [parse_strengths(args.steer)])


def cmd_eval(args) -> int:
    from vla_steer.wire import parse_setting

    return run_grid(args, args.env, [parse_setting(t) for t in args.settings])


def run_grid(args, envs: list[Path], settings: list[dict[str, float]]) -> int:
    import dataclasses
    import json

    from sim import session
    from sim.robosuite_env import load_sim_config
    from vla_steer.core.rollouts import write_video

    tasks = {path.stem: _robosuite_config(path, load_sim_config) for path in envs}
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: must be positive seconds")
    if args.video:  # checked now, not after every episode has run
        for label, cfg in tasks.items():
            if args.video not in cfg.cameras:
                raise ValueError(
                    f"--video {args.video}: {label} records the cameras {sorted(cfg.cameras)} (its `cameras:` "
                    "keys); pick one of them"
                )
    code, results = session.run_command(
        args.server, tasks, settings, out=args.out, episodes=args.episodes, max_steps=args.max_steps,
        seed=args.seed, execute_steps=args.execute_steps, activations=session.names(args.activations),
        server_key=args.server_key, keypair=args.keypair, request_timeout=args.timeout,
    )  # fmt: skip
    if code:
        return code
    (args.out / "eval.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    if args.video:
        for r in results:
            for episode_id in r.episode_ids:
                write_video(args.out, episode_id, args.video, args.out / "videos" / f"{episode_id}.mp4")
        print(f"videos in {args.out}/videos/")
    return 0


def _robosuite_config(path: Path, load):
    """A robosuite sim config; a LIBERO one is refused with how to run it (its own venv and node)."""
    import yaml

    try:
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind")
    except (OSError, yaml.YAMLError, AttributeError):
        kind = None  # the loader says what is wrong with the file
    if kind == "libero":
        raise ValueError(
            f"--env {path}: a LIBERO config; LIBERO runs in its own venv (`make libero`), as its own node: "
            f".venv-libero/bin/python -m sim.libero_node --env {path} --episodes N --out DIR [--steer NAME=S]"
        )
    return load(path)
