"""`vla-steer sim` (episodes against a policy node, recorded) and `vla-steer eval` (a grid, on workers or Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

from vla_steer.app.cli.args import add_run_options, config_path

ENV_HELP = (
    "robosuite sim config: a YAML file, or the name of a shipped one (robosuite_lift, robosuite_stack, ...)"
)
GRID_ENV_HELP = (
    "a robosuite sim config, or a LIBERO one: every task of its suite (libero_spatial), or some "
    "(libero_spatial:0,3 or libero_spatial:0-4); a YAML file or a shipped config's name; repeat for several"
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
        help="a grid of tasks x steering settings x seeded episodes on workers (or Ray), recorded, resumable",
        description="Every setting runs the same seeds, so baseline and steered episodes start alike. Tasks may "
        "be robosuite configs and whole LIBERO suites (run by workers in the LIBERO venv, "
        "$VLA_STEER_LIBERO_PYTHON, default .venv-libero). Rerunning into the same --out skips the episodes "
        "already complete there (and is refused if they ran with another policy, step limit or config). Example: vla-steer eval --env robosuite_lift --env libero_spatial:0,3 "
        f"--settings off fast=4 fast=8 --episodes 10 --workers 2 --out runs/grid. {EXIT_CODES}",
    )
    p.add_argument("--env", action="append", required=True, help=GRID_ENV_HELP)
    p.add_argument(
        "--settings",
        nargs="+",
        default=["off"],
        help="off, or NAME=S[,NAME=S...] per setting; AXIS@TARGET holds a setpoint (speed@0.10: 0.10 m/s)",
    )
    add_run_options(p)
    g = p.add_argument_group("scale")
    g.add_argument("--workers", type=int, default=1, help="simulator worker processes (default 1)")
    g.add_argument(
        "--shard", metavar="I/N", help="run only shard I of N (1-based; the shards together are the grid)"
    )
    g.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run on Ray: policy nodes and workers as actors (no ADDRESS: a local cluster; `auto`: the running one)",
    )  # fmt: skip
    g.add_argument(
        "--policy", help="with --ray: the policy each Ray policy node serves (as `vla-steer serve`)"
    )
    g.add_argument("--directions", type=Path, help="with --ray: the knobs' directions directory")
    g.add_argument("--device", help="with --ray: the policy's device (default: cuda where Ray has a GPU)")
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="with --ray")
    g.add_argument("--policy-nodes", type=int, default=1, help="with --ray: policy nodes (default 1)")
    p.set_defaults(func=cmd_eval)


def cmd_sim(args) -> int:
    import dataclasses
    import json

    from sim import session
    from sim.grid import DEFAULT_MAX_STEPS
    from sim.robosuite_env import load_sim_config
    from vla_steer.core.rollouts import write_video
    from vla_steer.wire import parse_strengths

    cfg = _robosuite_config(args.env, load_sim_config)
    _check_run(args, {args.env.stem: cfg.cameras})
    code, results = session.run_command(
        args.server, {args.env.stem: cfg}, [parse_strengths(args.steer)], out=args.out, episodes=args.episodes,
        max_steps=args.max_steps or DEFAULT_MAX_STEPS, seed=args.seed or 0, execute_steps=args.execute_steps,
        activations=session.names(args.activations), server_key=args.server_key, keypair=args.keypair,
        request_timeout=args.timeout,
    )  # fmt: skip
    if code:
        return code
    (args.out / "eval.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    _videos(args, [i for r in results for i in r.episode_ids], write_video)
    return 0


def _first_seed(tasks) -> int:
    """The grid's first seed when --seed is not given: its LIBERO configs' (profiles') `first_seed`, 0 for
    the others. Tasks that start at different seeds cannot share the grid's matched seeds: --seed decides."""
    from sim.worker import task_config

    seeds = {t.label: getattr(task_config(t.as_dict(), None)[0], "first_seed", 0) for t in tasks}
    if len(set(seeds.values())) > 1:
        raise ValueError(
            f"--seed: the tasks' configs start at different seeds ({seeds}, their first_seed); every setting "
            "runs the same seeds, so pass --seed to choose"
        )
    return next(iter(seeds.values()))


def cmd_eval(args) -> int:
    import dataclasses
    import json

    from sim import grid as grids
    from sim import session
    from sim.worker import WorkerFailed, interpreter, task_config
    from vla_steer.core.rollouts import write_video
    from vla_steer.wire import parse_setting

    settings = [parse_setting(t) for t in args.settings]
    grid = grids.Grid.build(args.env, settings, args.episodes, args.seed or 0)
    if args.seed is None:  # a profile's episode order (LeRobot's evaluations start at seed 1000)
        grid = dataclasses.replace(grid, seed=_first_seed(grid.tasks))
    cells = grid.shard(*grids.parse_shard(args.shard)) if args.shard else grid.cells()
    _check_run(args, {t.label: _cameras(t) for t in grid.tasks})
    _check_scale(args)
    for kind in sorted({c.task.kind for c in cells}):
        interpreter(kind)  # a missing LIBERO venv is said now, not by a worker after the weights load
    out = args.out.resolve()
    run = {
        "server": args.server, "out": str(out), "max_steps": args.max_steps, "execute_steps": args.execute_steps,
        "settle": 0, "activations": session.names(args.activations), "request_timeout": args.timeout,
        "connect_timeout": 10.0, "server_key": _abs(args.server_key), "keypair": _abs(args.keypair),
    }  # fmt: skip
    tasks = list(dict.fromkeys(c.task for c in cells))
    ran = {
        t.label: grids.run_fields(t, task_config(t.as_dict(), args.max_steps)[1], args.execute_steps, run["settle"])
        for t in tasks
    }  # fmt: skip
    done = grids.done_episodes(out)
    grids.check_resume(cells, done, ran, out)
    todo = grids.remaining(cells, done)
    total = sum(len(c.seeds) for c in cells)
    skipped = total - sum(len(c.seeds) for c in todo)
    if skipped:
        print(f"resuming: {skipped} of {total} episodes are complete in {out} already", file=sys.stderr)

    def check_policy(info) -> None:  # the node the missing episodes would run against ran the done ones
        grids.check_resume(cells, done, {t.label: grids.policy_fields(info) for t in tasks}, out)

    code = 0
    if not todo and args.ray is not None:
        print("nothing left to run: no Ray cluster started (so its policy is not checked)", file=sys.stderr)
    else:  # locally the node is checked even with nothing left to run: are the stored episodes its own?
        from sim.scheduler import Progress

        try:
            _run_cells(args, todo, settings, run, Progress(total, skipped), check_policy)
        except session.NoPolicyNode as e:
            print(f"error: {e}", file=sys.stderr)
            return session.NO_POLICY_NODE
        except WorkerFailed as e:
            print(f"error: {e}", file=sys.stderr)
            code = e.code
    results = grids.results(cells, grids.done_episodes(out))
    print(session.summary(results, out), flush=True)
    (out / "eval.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    if not code:
        _videos(args, [i for r in results for i in r.episode_ids], write_video)
    return code


def _run_cells(args, todo, settings, run, progress, check_policy) -> None:
    """The cells on local worker processes against --server, or on Ray against its policy nodes; each node
    checked first (it answers, has the knobs, and `check_policy` accepts it)."""
    from sim import session
    from sim.scheduler import local_slots, run_cells
    from vla_steer.wire import Client

    if args.ray is None:
        with Client(args.server, server_key=args.server_key, keypair=args.keypair, timeout=args.timeout) as c:
            check_policy(session.check_node(c, settings, 10.0))
        run_cells(todo, local_slots(args.workers, run), progress)
        return
    from sim.ray_grid import RayCluster

    policy = str(Path(args.policy).resolve()) if Path(args.policy).exists() else args.policy
    serve = [
        "--policy",
        policy,
        *(["--directions", str(args.directions.resolve())] if args.directions else []),
    ]
    serve += [
        *(["--device", args.device] if args.device else []),
        *(a for o in args.option for a in ("-o", o)),
    ]
    print(f"starting Ray ({args.ray}) and {args.policy_nodes} policy node(s)", file=sys.stderr, flush=True)
    cluster = RayCluster(args.ray, serve, args.policy_nodes, args.workers, Path(run["out"]) / "logs")
    try:
        for info in cluster.check(settings):
            check_policy(info)
        run_cells(todo, cluster.slots(run), progress)
    finally:
        cluster.shutdown()


def _check_run(args, cameras: dict[str, dict[str, str]]) -> None:
    """What every run checks before anything connects: numbers in range, the video camera recorded."""
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: must be positive seconds")
    if args.episodes < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError("--episodes and --max-steps must be at least 1")
    if args.video:  # checked now, not after every episode has run
        for label, cams in cameras.items():
            if args.video not in cams:
                raise ValueError(
                    f"--video {args.video}: {label} records the cameras {sorted(cams)} (its `cameras:` "
                    "keys); pick one of them"
                )


def _check_scale(args) -> None:
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    ray_only = [f for f, v in (("--policy", args.policy), ("--directions", args.directions),
                               ("--device", args.device), ("-o", args.option)) if v]  # fmt: skip
    if args.ray is None:
        if ray_only or args.policy_nodes != 1:
            raise ValueError(
                f"{(ray_only or ['--policy-nodes'])[0]} is for --ray (Ray starts the policy nodes); locally, "
                "start `vla-steer serve` and pass its --server"
            )
        return
    if not args.policy:
        raise ValueError("--ray needs --policy (and usually --directions): the policy its nodes serve")
    if args.policy_nodes < 1:
        raise ValueError(f"--policy-nodes {args.policy_nodes}: must be at least 1")
    if args.server_key or args.keypair:
        raise ValueError(
            "--server-key/--keypair are for --server; Ray's policy nodes listen on loopback only"
        )
    if args.directions is not None and not args.directions.is_dir():
        raise FileNotFoundError(f"--directions {args.directions}: no such directory")


def _cameras(task) -> dict[str, str]:
    if task.kind == "libero":
        from sim.libero_env import load_libero_config

        return load_libero_config(task.config).cameras
    from sim.robosuite_env import load_sim_config

    return load_sim_config(task.config).cameras


def _abs(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None


def _videos(args, episode_ids: list[str], write_video) -> None:
    if args.video:
        for episode_id in episode_ids:
            write_video(args.out, episode_id, args.video, args.out / "videos" / f"{episode_id}.mp4")
        print(f"videos in {args.out}/videos/")


def _robosuite_config(path: Path, load):
    """A robosuite sim config; a LIBERO one is refused with how to run it (eval drives LIBERO workers)."""
    import yaml

    try:
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind")
    except (OSError, yaml.YAMLError, AttributeError):
        kind = None  # the loader says what is wrong with the file
    if kind == "libero":
        raise ValueError(
            f"--env {path}: a LIBERO config; LIBERO runs in its own venv, driven by `vla-steer eval`: "
            f"vla-steer eval --env {path.stem}:0 --episodes N --out DIR --settings NAME=S"
        )
    return load(path)
