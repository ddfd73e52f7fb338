"""`vla-steer sim` (episodes against a policy node, recorded) and `vla-steer eval` (a grid of settings)."""

from __future__ import annotations

import sys
from pathlib import Path

from vla_steer.app.cli.args import add_run_options


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sim",
        help="run simulated episodes against a policy node and record them",
        description="Connect to a running policy node (`vla-steer serve`), run episodes in a simulator, record "
        "every step into a rollout store, and print a summary. Example: vla-steer sim --env "
        "configs/sims/robosuite_lift.yaml --episodes 5 --out runs/lift --steer fast=4",
    )
    p.add_argument("--env", type=Path, required=True, help="simulator config YAML (configs/sims/*.yaml)")
    p.add_argument(
        "--steer", nargs="*", default=[], metavar="NAME=STRENGTH", help="knobs to set (others off)"
    )
    add_run_options(p)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser(
        "eval",
        help="a grid of tasks x steering settings x seeded episodes, recorded and summarised",
        description="Every setting starts from all knobs off and uses the same seeds, so baseline and steered "
        "episodes start alike. Example: vla-steer eval --env configs/sims/robosuite_lift.yaml --settings off "
        "fast=4 fast=8 slow=4 --episodes 10 --out runs/grid",
    )
    p.add_argument(
        "--env", type=Path, action="append", required=True, help="simulator config (repeat for several)"
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

    from sim.evaluate import evaluate, format_results
    from sim.robosuite_env import RobosuiteEnv, load_sim_config
    from vla_steer.core.rollouts import Recorder, write_video
    from vla_steer.wire import Client

    if args.episodes < 1 or args.max_steps < 1:
        raise ValueError("--episodes and --max-steps must be at least 1")
    configs = {path.stem: load_sim_config(path) for path in envs}
    wanted = [a.strip() for a in args.activations.split(",") if a.strip()] or None
    with Client(args.server, server_key=args.server_key, keypair=args.keypair) as client:
        if not client.wait_alive(10.0):
            print(f"error: no policy node answered at {args.server}", file=sys.stderr)
            return 3
        info = client.hello()
        unknown = sorted({k for st in settings for k in st} - set(info.concepts))
        if unknown:
            raise ValueError(f"the node has no knobs {unknown} (it offers {list(info.concepts)})")
        meta = {"sim": "robosuite", "policy": info.policy, "policy_info": dict(info.info)}
        tasks = {}
        for label, cfg in configs.items():
            tasks[label] = lambda cfg=cfg: RobosuiteEnv(cfg, info)
        results = evaluate(
            client, tasks, settings, episodes=args.episodes, max_steps=args.max_steps, recorder=Recorder(args.out),
            meta=meta, task_meta={label: _conventions(cfg) for label, cfg in configs.items()}, seed=args.seed,
            execute_steps=args.execute_steps, activations=wanted,
        )  # fmt: skip
    print(format_results(results))
    total = sum(r.episodes for r in results)
    rate = sum(r.success_rate * r.episodes for r in results) / max(1, total)
    print(f"success rate {rate:.0%} over {total} episodes; recorded in {args.out}/")
    (args.out / "eval.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    if args.video:
        for r in results:
            for episode_id in r.episode_ids:
                write_video(args.out, episode_id, args.video, args.out / "videos" / f"{episode_id}.mp4")
        print(f"videos in {args.out}/videos/")
    return 0


def _conventions(cfg) -> dict:
    """What a rollout's reader needs to interpret it (policies and simulators differ on each)."""
    return {
        "task": cfg.task,
        "robot": cfg.robot,
        "sim_config": cfg.model_dump(mode="json"),
        "conventions": {
            "state": cfg.state,
            "gripper": cfg.gripper,
            "rotate_images_180": cfg.rotate_images_180,
        },
    }
