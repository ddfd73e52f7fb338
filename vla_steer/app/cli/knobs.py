"""`vla-steer knobs`: list, read and turn a running policy node's knobs; `knobs ui` is the operator page."""

from __future__ import annotations

import sys

from vla_steer.app.cli.args import add_security


def add_parsers(sub) -> None:
    from vla_steer.app.cli.robot import add_knobs_ui_options

    p = sub.add_parser(
        "knobs",
        help="list, read and turn the steering knobs of a running policy node",
        description="Examples: `vla-steer knobs list`, `vla-steer knobs set fast=4 up=2`, "
        "`vla-steer knobs disable fast`, `vla-steer knobs off`, `vla-steer knobs ui` (the operator page). "
        "Setpoints: `vla-steer knobs target speed=0.10` holds the end effector's speed while moving at 0.10 m/s "
        "(the node's controller sets fast/slow from what each client's episode measures); "
        "`vla-steer knobs untarget speed` lets go (`off` drops every knob and setpoint).",
    )
    p.add_argument(
        "op", choices=("list", "get", "set", "enable", "disable", "off", "target", "untarget", "ui")
    )
    p.add_argument(
        "args",
        nargs="*",
        help="set: NAME=STRENGTH ...; target: AXIS=VALUE ... (speed in m/s, height in m); "
        "get/enable/disable: NAME ...; untarget: AXIS ...",
    )
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the node's address")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the node")
    add_security(p, server=False)
    add_knobs_ui_options(p)
    p.set_defaults(func=cmd_knobs)


def cmd_knobs(args) -> int:
    if args.op == "ui":
        from vla_steer.app.cli.robot import cmd_knobs_ui

        return cmd_knobs_ui(args)
    from vla_steer.wire import Client, KnobsRequest, RemoteError, RequestTimeout, parse_strengths

    if args.op == "set":
        if not args.args:
            raise ValueError("knobs set needs NAME=STRENGTH arguments")
        req = KnobsRequest("set", strengths=parse_strengths(args.args))
    elif args.op == "target":
        if not args.args:
            raise ValueError("knobs target needs AXIS=VALUE arguments, e.g. speed=0.10")
        req = KnobsRequest("target", targets=parse_strengths(args.args, "targets look like speed=0.10"))
    elif args.op == "untarget":
        if not args.args:
            raise ValueError("knobs untarget needs axis names, e.g. speed")
        req = KnobsRequest("untarget", axes=tuple(args.args))
    elif args.op in ("enable", "disable") and not args.args:
        raise ValueError(f"knobs {args.op} needs concept names")
    else:
        req = KnobsRequest(args.op, tuple(args.args) if args.args else None)
    try:
        with Client(args.server, timeout=args.timeout, retries=0, heartbeat_interval=None,
                    server_key=args.server_key, keypair=args.keypair) as client:  # fmt: skip
            reply = client.request("knobs", req.to_payload()).payload
    except RequestTimeout:
        print(f"error: no policy node answered at {args.server} within {args.timeout:g} s", file=sys.stderr)
        return 3
    except RemoteError as e:
        print(f"error: the node refused: {e}", file=sys.stderr)
        return 2
    print(format_knobs(reply["knobs"]))
    targets = reply.get("info", {}).get("targets") or {}
    print("setpoints: " + (", ".join(f"{axis}={value:g}" for axis, value in targets.items()) or "none"))
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
