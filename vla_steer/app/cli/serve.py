"""`vla-steer serve` (a policy and its knobs over ZeroMQ) and `vla-steer keys` (CURVE key pairs)."""

from __future__ import annotations

from pathlib import Path

from vla_steer.app.cli.args import add_security, config_path
from vla_steer.app.cli.openpi_door import add_openpi_options, openpi_door, openpi_settings


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a policy and its steering knobs over ZeroMQ",
        description="Load a policy, register its directions as knobs (all off), and serve infer / reset / "
        "knobs requests until interrupted. Binds loopback only unless keys (or --allow-insecure) are given. "
        "Example: vla-steer serve --policy demo_vla --directions demo_out/directions",
    )
    p.add_argument(
        "--policy",
        type=config_path("policies"),
        required=True,
        help="policy config: a YAML file, or the name of a shipped one (demo_vla, openvla_7b, pi0_libero, ...)",
    )
    p.add_argument("--directions", type=Path, help="directory of direction JSON files to offer as knobs")
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:5555", help="request socket (default tcp://127.0.0.1:5555)"
    )
    p.add_argument("--telemetry", help="telemetry PUB socket, e.g. tcp://127.0.0.1:5556 (default: none)")
    p.add_argument(
        "--mode", choices=("clamp", "add", "scale"), default="clamp", help="steering mode of every knob"
    )
    p.add_argument("--positions", choices=("all", "last"), default="all", help="token positions to steer")
    add_security(p, server=True)
    add_openpi_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="generate a CURVE key pair (NAME.key to share, NAME.key_secret to keep)")
    p.add_argument("directory", type=Path)
    p.add_argument("name", help="e.g. server, sim, robot, operator")
    p.add_argument("--force", action="store_true", help="replace an existing keypair of that name")
    p.set_defaults(func=cmd_keys)


def cmd_serve(args) -> int:
    import signal
    import threading

    openpi = openpi_settings(args)  # bad flags fail before anything heavy is imported or loaded

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
    with server.start(), openpi_door(server, openpi):
        concepts = ", ".join(node.steerer.concepts) or "none"
        print(f"serving {policy.spec.name} on {server.address} (knobs: {concepts})", flush=True)
        if server.telemetry_address:
            print(f"telemetry on {server.telemetry_address}", flush=True)
        stop.wait()
    print("stopped", flush=True)
    return 0


def cmd_keys(args) -> int:
    from vla_steer.wire import generate_keypair

    try:
        public, secret = generate_keypair(args.directory, args.name, overwrite=args.force)
    except FileExistsError as e:
        raise ValueError(
            f"{e}; pass --force to replace it (its peers will need the new public key)"
        ) from None
    print(f"public key (give it to peers): {public}\nsecret key (keep it here, mode 0600): {secret}")
    return 0
