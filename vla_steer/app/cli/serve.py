"""`vla-steer serve` (a policy and its knobs over ZeroMQ) and `vla-steer keys` (CURVE key pairs)."""

from __future__ import annotations

from pathlib import Path

from vla_steer.app.cli.args import add_policy_argument, add_security
from vla_steer.app.cli.openpi_door import add_openpi_options, openpi_door, openpi_settings


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a policy and its steering knobs over ZeroMQ",
        description="Load a policy, register its directions as knobs (all off), and serve infer / reset / "
        "knobs requests until interrupted. Binds loopback only unless keys (or --allow-insecure) are given. "
        "Flags, directions, keys and ports are checked before the weights load. Examples: vla-steer serve "
        "--policy demo_vla --directions demo_out/directions; vla-steer serve --policy /ckpt/pi0_libero; "
        "vla-steer serve --policy openvla/openvla-7b -o unnorm_key=bridge_orig --device cuda",
    )
    add_policy_argument(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the policy config's, else cpu)")
    p.add_argument("--directions", type=Path, help="directory of direction JSON files to offer as knobs")
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:5555", help="request socket (default tcp://127.0.0.1:5555)"
    )
    p.add_argument("--telemetry", help="telemetry PUB socket, e.g. tcp://127.0.0.1:5556 (default: none)")
    p.add_argument(
        "--mode", choices=("clamp", "add", "scale"), default="clamp", help="steering mode of every knob"
    )
    p.add_argument(
        "--positions",
        choices=("all", "last", "plan"),
        default=None,
        help="token positions to steer: all, the last of each forward, or (a policy that says a plan first) "
        "only the forwards that decide its plan words (default: plan for such a policy, the demo VLA; else all)",
    )
    p.add_argument(
        "--batch-max",
        type=int,
        default=8,
        help="most concurrent infer requests batched into one forward (1: one at a time; default 8)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a batch waits for the clients that asked together last time (a lone client never "
        "waits; default 2)",
    )
    p.add_argument(
        "--setpoint-controller",
        default="",
        metavar="kp=5,ki=5,limit=24,rate=4",
        help="the PI controller that holds a setpoint (`knobs target speed=0.10`): gains per unit of relative "
        "error, the largest |strength| it sets and its most change per inference; the strength a behaviour "
        "needs is the model's (the demo VLA's plan changes from about 30). Default: kp=5,ki=5,limit=24,rate=4",
    )
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

    from vla_steer.wire.server import MAX_PENDING

    openpi = openpi_settings(args)  # bad flags fail before anything heavy is imported or loaded
    if not 1 <= args.batch_max <= MAX_PENDING:
        raise ValueError(
            f"--batch-max must be 1..{MAX_PENDING} (the node queues at most {MAX_PENDING} requests), "
            f"got {args.batch_max}"
        )
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms must be 0..1000, got {args.batch_wait_ms}")
    controller = parse_controller(args.setpoint_controller)

    from policies import load_policy
    from policies.resolve import resolve_policy, says_plan, stack_dims
    from vla_steer.core.discovery.direction import load_directions
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Server

    target = resolve_policy(args.policy, kind=args.kind, settings=dict(args.option), device=args.device)
    directions = list(load_directions(args.directions).values()) if args.directions else []
    check_directions(directions, stack_dims(target), args.directions)
    plans = says_plan(target)
    if args.positions is None:  # a planning policy's concepts act through its plan (see `vla-steer demo`)
        args.positions = "plan" if plans else "all"
    if args.positions == "plan" and not plans:
        raise ValueError(
            f"--positions plan steers the forwards that decide a policy's plan words; {args.policy} "
            f"({target.kind}) says no plan before its actions: use --positions all or last"
        )
    check_listen(args)
    policy = load_policy(target)
    node = PolicyNode(
        policy,
        directions,
        mode=args.mode,
        positions=args.positions,
        batch_max=args.batch_max,
        controller=controller,
    )
    server = Server(
        node,
        args.bind,
        telemetry_address=args.telemetry,
        keypair=args.keypair,
        allowed_clients=args.allow_clients,
        allow_insecure=args.allow_insecure,
        batch_wait=args.batch_wait_ms / 1e3,
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


def check_directions(directions: list, dims: dict[str, tuple[int, int]] | None, where: Path | None) -> None:
    """Every direction steers a stack the policy has, inside its layers and width (before weights load)."""
    if dims is None:
        return
    for d in directions:
        key = d.provenance.get("backbone", "language")
        if key not in dims:
            raise ValueError(
                f"--directions {where}: {d.name} steers stack {key!r}; this policy has {sorted(dims)}"
            )
        n_layers, d_mlp = dims[key]
        bad = [n for n in d.neurons if not (0 <= n.layer < n_layers and 0 <= n.index < d_mlp)]
        if bad:
            raise ValueError(
                f"--directions {where}: {d.name} has neuron layer {bad[0].layer} index {bad[0].index}, outside "
                f"this policy's {key} stack ({n_layers} layers x {d_mlp} neurons): made for another model?"
            )


def check_listen(args) -> None:
    """Keys readable, no insecure bind, ports free: all before the weights load (minutes for a 7B)."""
    from vla_steer.wire.security import as_keypair, check_bind, load_allow_list

    secure = args.keypair is not None
    if secure != (args.allow_clients is not None):
        raise ValueError(
            "--keypair and --allow-clients go together (the server's secret key, the clients' keys)"
        )
    if secure:
        as_keypair(args.keypair, True, "--keypair")
        load_allow_list(args.allow_clients)
    for flag, address in (("--bind", args.bind), ("--telemetry", args.telemetry)):
        if address is None:
            continue
        try:
            check_bind(address, secure, args.allow_insecure)
        except ValueError:
            raise ValueError(
                f"{flag} {address} is not loopback: give it CURVE keys (--keypair and --allow-clients, see "
                "`vla-steer keys`), bind 127.0.0.1, or pass --allow-insecure to let anyone on the network drive "
                "the policy"
            ) from None
        _check_port_free(flag, address)


def _check_port_free(flag: str, address: str) -> None:
    import re

    from vla_steer.app.cli.args import check_port_free

    m = re.fullmatch(r"tcp://(\[?[^\]]*\]?|[^:]*):(\d+)", address)
    if m:  # ipc:// has no port to probe
        hint = "is another `vla-steer serve` running? Choose another port, e.g. --bind tcp://127.0.0.1:5565"
        check_port_free(f"{flag} {address}", m.group(1), int(m.group(2)), hint)


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


def parse_controller(text: str) -> dict[str, float]:
    """`kp=8,limit=40` -> the setpoint controller's settings, checked by building one (before any loading)."""
    from vla_steer.core.setpoints import PIController
    from vla_steer.wire import parse_strengths

    items = [t for t in text.split(",") if t.strip()]
    settings = parse_strengths(items, "--setpoint-controller takes kp=5,ki=5,limit=24,rate=4")
    unknown = sorted(set(settings) - {"kp", "ki", "limit", "rate"})
    if unknown:
        raise ValueError(
            f"--setpoint-controller: unknown setting {unknown[0]!r} (known: kp, ki, limit, rate)"
        )
    PIController(**settings)  # its own checks: finite, >= 0, limit and rate > 0
    return settings
