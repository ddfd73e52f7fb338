"""`vla-steer`: one entry point, one subcommand per job (`vla-steer SUBCOMMAND --help`)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

from vla_steer.core.config import shipped
from vla_steer.wire import parse_setting, parse_strengths

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'1GiB', '512MB', '1e9'-free plain integers: bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 1GiB, 2000000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_layers(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"layer range must look like 15-31 or 7, got {text!r}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo > hi:
        raise argparse.ArgumentTypeError(f"layer range {text!r} is empty")
    return lo, hi


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """'4,8' -> (4.0, 8.0); finite numbers only, the error names the option and the bad item."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{what}: {item.strip()!r} is not a number (expected e.g. 4,8)") from None
        if not math.isfinite(value):
            raise ValueError(f"{what}: {item.strip()!r} is not a finite number")
        out.append(value)
    return tuple(out)


# -- discover ------------------------------------------------------------------------------------


def _add_discover(sub) -> None:
    p = sub.add_parser(
        "discover",
        help="find concept neurons of a model and save them as directions",
        description="Project every FFN value vector onto the vocabulary (cached as a neuron index), "
        "score neurons against concept lexicons (or cluster them by meaning), and save one direction per pole.",
    )
    p.add_argument("model", help="local checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("directions"),
        help="where directions are written (default: ./directions)",
    )
    p.add_argument("--index-dir", type=Path, help="neuron index cache (default: OUT/index)")
    p.add_argument(
        "--concepts", type=Path, default=None, help="lexicon directory (default: the repo's configs/concepts)"
    )
    p.add_argument("--poles", help="comma-separated poles to discover (default: all in the lexicons)")
    p.add_argument("--method", choices=("lexicon", "clusters"), default="lexicon")
    p.add_argument("--k", type=int, default=20, help="top/bottom tokens kept per neuron (default 20)")
    p.add_argument("--rank-by", choices=("logit", "cosine"), default="logit")
    p.add_argument(
        "--layers", type=parse_layers, help="inclusive layer range to choose neurons from, e.g. 15-31"
    )
    p.add_argument("--size", type=int, default=16, help="neurons per direction (default 16)")
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument(
        "--memory-budget", type=parse_size, default=parse_size("1GiB"), help="extra memory for the projection"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--lora", type=Path, help="PEFT LoRA adapter directory to merge before projecting")
    p.add_argument(
        "--action-bins",
        type=int,
        help="top N tokenizer ids are OpenVLA action bins (default: config's n_action_bins)",
    )
    p.set_defaults(func=_cmd_discover)


def _cmd_discover(args) -> int:
    from vla_steer.core.discovery import discover, format_direction, load_lexicons
    from vla_steer.core.loading import load_backbone

    poles = load_lexicons(args.concepts or shipped("concepts"))
    if args.poles:
        wanted = [p.strip() for p in args.poles.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in poles]
        if unknown:
            raise SystemExit(f"error: unknown poles {unknown}; the lexicons define {sorted(poles)}")
        poles = {p: poles[p] for p in wanted}
    model_device = (
        "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    )
    backbone = load_backbone(
        args.model, dtype=args.dtype, device=model_device, lora=args.lora, action_bins=args.action_bins
    )
    print(f"{backbone.name}: {backbone.n_layers} layers x {backbone.d_mlp} neurons, vocab {backbone.vocab_size} "
          f"(fingerprint {backbone.fingerprint()})")  # fmt: skip
    directions = discover(
        backbone,
        poles,
        index_dir=args.index_dir or args.out / "index",
        method=args.method,
        k=args.k,
        rank_by=args.rank_by,
        layers=args.layers,
        size=args.size,
        min_score=args.min_score,
        memory_budget=args.memory_budget,
        device=args.device,
    )
    for d in directions.values():
        print()
        print(format_direction(d))
        d.save(args.out)
    print(f"\nwrote {len(directions)} directions to {args.out}/")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- paper dictionaries --------------------------------------------------------------------------


def _add_paper(sub) -> None:
    p = sub.add_parser("paper-dict", help="import or export the paper repo's dictionaries.yaml")
    ps = p.add_subparsers(dest="action", required=True)
    imp = ps.add_parser("import", help="paper YAML -> direction files")
    imp.add_argument("yaml", type=Path)
    imp.add_argument("--d-mlp", type=int, required=True, help="neurons per layer (OpenVLA: 11008)")
    imp.add_argument("--out", type=Path, default=Path("directions"))
    imp.add_argument("--names", help="comma-separated dictionary names (default: all)")
    exp = ps.add_parser("export", help="direction files -> paper YAML")
    exp.add_argument("directions", type=Path, help="directory of direction JSON files")
    exp.add_argument("--d-mlp", type=int, required=True)
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--drop-negative", action="store_true", help="leave out neurons of negative polarity")
    p.set_defaults(func=_cmd_paper)


def _cmd_paper(args) -> int:
    from vla_steer.core.discovery.direction import export_paper_yaml, import_paper_yaml, load_directions

    if args.action == "import":
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        directions = import_paper_yaml(args.yaml, args.d_mlp, names=names)
        for d in directions.values():
            d.save(args.out)
        print(f"imported {len(directions)} dictionaries into {args.out}/: {', '.join(directions)}")
    else:
        directions = list(load_directions(args.directions).values())
        export_paper_yaml(directions, args.d_mlp, args.out, drop_negative=args.drop_negative)
        print(f"exported {len(directions)} directions to {args.out}")
    return 0


# -- demo, train-demo, analyze ---------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole method on the bundled demo VLA: discovery, steered robosuite episodes, report",
        description="Discover the demo VLA's fast/slow/up/down neurons, run baseline, steered and "
        "random-neuron control episodes on robosuite Lift (policy node + sim node over ZeroMQ), record them, "
        "and write an analysis report (OUT/report.html, OUT/summary.json).",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="run directory (default: demo_out)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per setting (default: 20)")
    p.add_argument("--workers", type=int, default=2, help="parallel policy+sim node pairs (default: 2)")
    p.add_argument(
        "--strengths", default="8,12", help="clamp values for each direction, comma-separated (default: 8,12)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="a demo VLA checkpoint (default: the bundled one)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from policies.demo import WEIGHTS
    from vla_steer.app.demo.run import run_demo

    strengths = parse_floats(args.strengths, "--strengths")
    if args.episodes < 1 or args.workers < 1:
        raise ValueError("--episodes and --workers must be >= 1")
    run_demo(
        args.out, episodes=args.episodes, workers=args.workers, strengths=strengths,
        weights=args.weights or WEIGHTS, seed=args.seed,
    )  # fmt: skip
    return 0


def _add_train_demo(sub) -> None:
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
    p.add_argument("--episodes-per-setting", type=int, default=20, help="demonstrations per speed x height")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    p.add_argument("--workers", type=int, default=2, help="processes generating demonstrations")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_demo)


def _cmd_train_demo(args) -> int:
    import time

    import torch

    from vla_steer.app.demo.data import generate
    from vla_steer.app.demo.train import train

    t0 = time.perf_counter()
    data = args.data
    if data is None:
        data = args.out.with_name(args.out.name + "_demonstrations.npz")
        print(f"generating {9 * args.episodes_per_setting} scripted demonstrations -> {data}")
        generate(data, args.episodes_per_setting, seed=args.seed, workers=args.workers)
        print(f"   {time.perf_counter() - t0:.0f} s")
    elif not data.is_file():
        raise FileNotFoundError(f"--data {data} does not exist")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train(data, args.out, steps=args.steps, seed=args.seed)
    print(f"saved the demo VLA to {args.out} ({(time.perf_counter() - t0) / 60:.1f} min in all)")
    return 0


def _add_analyze(sub) -> None:
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
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
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


# -- serve, knobs, keys --------------------------------------------------------------------------


def _add_security(p, server: bool) -> None:
    g = p.add_argument_group("CURVE encryption (see `vla-steer keys`)")
    if server:
        g.add_argument("--keypair", type=Path, help="this server's .key_secret file")
        g.add_argument("--allow-clients", type=Path, help="directory of allowed client public .key files")
        g.add_argument(
            "--allow-insecure",
            action="store_true",
            help="bind a non-loopback address without keys (anyone on the network can drive the policy)",
        )
    else:
        g.add_argument("--server-key", type=Path, help="the server's public .key file")
        g.add_argument("--keypair", type=Path, help="this client's .key_secret file")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a policy and its steering knobs over ZeroMQ",
        description="Load a policy, register its directions as knobs (all off), and serve infer / reset / "
        "knobs requests until interrupted. Binds loopback only unless keys (or --allow-insecure) are given.",
    )
    p.add_argument("--policy", type=Path, required=True, help="policy config YAML (configs/policies/*.yaml)")
    p.add_argument("--directions", type=Path, help="directory of direction JSON files to offer as knobs")
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:5555", help="request socket (default tcp://127.0.0.1:5555)"
    )
    p.add_argument("--telemetry", help="telemetry PUB socket, e.g. tcp://127.0.0.1:5556 (default: none)")
    p.add_argument(
        "--mode", choices=("clamp", "add", "scale"), default="clamp", help="steering mode of every knob"
    )
    p.add_argument("--positions", choices=("all", "last"), default="all", help="token positions to steer")
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import signal
    import threading

    from policies import load_policy
    from vla_steer.core.discovery.direction import load_directions
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Server

    policy = load_policy(args.policy)
    directions = list(load_directions(args.directions).values()) if args.directions else []
    node = PolicyNode(policy, directions, mode=args.mode, positions=args.positions)
    server = Server(
        node,
        args.bind,
        telemetry_address=args.telemetry,
        keypair=args.keypair,
        allowed_clients=args.allow_clients,
        allow_insecure=args.allow_insecure,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server.start():
        concepts = ", ".join(node.steerer.concepts) or "none"
        print(f"serving {policy.spec.name} on {server.address} (knobs: {concepts})", flush=True)
        if server.telemetry_address:
            print(f"telemetry on {server.telemetry_address}", flush=True)
        stop.wait()
    print("stopped", flush=True)
    return 0


def _add_knobs(sub) -> None:
    p = sub.add_parser(
        "knobs",
        help="list, read and turn the steering knobs of a running policy node",
        description="Examples: `vla-steer knobs list`, `vla-steer knobs set fast=4 up=2`, "
        "`vla-steer knobs disable fast`, `vla-steer knobs off`, `vla-steer knobs ui` (the operator page).",
    )
    p.add_argument("op", choices=("list", "get", "set", "enable", "disable", "off", "ui"))
    p.add_argument("args", nargs="*", help="set: NAME=STRENGTH ...; get/enable/disable: NAME ...")
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the node's address")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the node")
    _add_security(p, server=False)
    from vla_steer.app.cli.robot import add_knobs_ui_options

    add_knobs_ui_options(p)
    p.set_defaults(func=_cmd_knobs)


def _cmd_knobs(args) -> int:
    if args.op == "ui":
        from vla_steer.app.cli.robot import cmd_knobs_ui

        return cmd_knobs_ui(args)
    from vla_steer.wire import Client, KnobsRequest, RemoteError, RequestTimeout

    if args.op == "set":
        if not args.args:
            raise ValueError("knobs set needs NAME=STRENGTH arguments")
        req = KnobsRequest("set", strengths=parse_strengths(args.args))
    elif args.op in ("enable", "disable") and not args.args:
        raise ValueError(f"knobs {args.op} needs concept names")
    else:
        req = KnobsRequest(args.op, tuple(args.args) if args.args else None)
    try:
        with Client(args.server, timeout=args.timeout, retries=0, heartbeat_interval=None,
                    server_key=args.server_key, keypair=args.keypair) as client:  # fmt: skip
            state = client.knobs(req)
    except RequestTimeout:
        print(f"error: no policy node answered at {args.server} within {args.timeout:g} s", file=sys.stderr)
        return 3
    except RemoteError as e:
        print(f"error: the node refused: {e}", file=sys.stderr)
        return 2
    print(format_knobs(state))
    return 0


def format_knobs(state: dict) -> str:
    if not state:
        return "(no knobs: the node was started without --directions)"
    lines = [f"{'knob':<14} {'on':<3} {'mode':<6} {'strength':>9} {'neurons':>8}  layers"]
    for name, s in state.items():
        layers = s.get("layers", [])
        span = f"{min(layers)}-{max(layers)}" if layers else "-"
        lines.append(
            f"{name:<14} {'on' if s['enabled'] else '-':<3} {s['mode']:<6} {s['strength']:>9g} {s['n_neurons']:>8}  {span}"
        )
    return "\n".join(lines)


def _add_run_options(p) -> None:
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy node's address")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task and setting")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument(
        "--execute-steps", type=int, help="actions executed per chunk before re-planning (default: all)"
    )
    p.add_argument(
        "--activations", default="", help="comma-separated concepts or layer:N to record with every step"
    )
    p.add_argument("--out", type=Path, required=True, help="rollout store directory (appended to)")
    p.add_argument("--seed", type=int, default=0, help="episode i of every setting uses seed + i")
    p.add_argument(
        "--video", metavar="CAMERA", help="also write an mp4 per episode from this camera (e.g. agentview)"
    )
    _add_security(p, server=False)


def _add_sim(sub) -> None:
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
    _add_run_options(p)
    p.set_defaults(func=lambda args: _run_grid(args, [args.env], [parse_strengths(args.steer)]))


def _add_eval(sub) -> None:
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
    _add_run_options(p)
    p.set_defaults(func=lambda args: _run_grid(args, args.env, [parse_setting(t) for t in args.settings]))


def _run_grid(args, envs: list[Path], settings: list[dict[str, float]]) -> int:
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


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="generate a CURVE key pair (NAME.key to share, NAME.key_secret to keep)")
    p.add_argument("directory", type=Path)
    p.add_argument("name", help="e.g. server, sim, robot, operator")
    p.set_defaults(func=_cmd_keys)


def _cmd_keys(args) -> int:
    from vla_steer.wire import generate_keypair

    public, secret = generate_keypair(args.directory, args.name)
    print(f"public key (give it to peers): {public}\nsecret key (keep it here, mode 0600): {secret}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-steer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what is reused or recomputed")
    # Every subcommand takes the common options after its name: `vla-steer discover ... -v`.
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[common, *kw.pop("parents", [])], **kw)
    _add_discover(sub)
    _add_paper(sub)
    _add_serve(sub)
    _add_knobs(sub)
    _add_keys(sub)
    _add_sim(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_train_demo(sub)
    from vla_steer.app.cli.robot import add_robot_parser

    add_robot_parser(sub)
    _add_analyze(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        import zmq  # a bad address or a port in use: say which, without a traceback

        if isinstance(e, zmq.ZMQError):
            print(
                f"error: ZeroMQ refused the address ({e}); addresses look like tcp://127.0.0.1:5555",
                file=sys.stderr,
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
