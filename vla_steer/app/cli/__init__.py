"""`vla-steer`: one entry point, one subcommand per job (`vla-steer SUBCOMMAND --help`).

Each command group lives in its own module, which registers its subcommands (`add_parsers(sub)`) and holds
their handlers; handlers import what they need when they run, so `vla-steer --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vla_steer.app.cli import analyze, demo, discover, export, knobs, serve, sim, store, view
from vla_steer.app.cli.robot import add_robot_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-steer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what is reused or recomputed")
    # Every subcommand takes the common options after its name: `vla-steer discover ... -v`.
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[common, *kw.pop("parents", [])], **kw)
    discover.add_parsers(sub)  # discover, paper-dict
    serve.add_parsers(sub)  # serve, keys
    knobs.add_parsers(sub)
    sim.add_parsers(sub)  # sim, eval
    demo.add_parsers(sub)  # demo, train-demo
    add_robot_parser(sub)
    analyze.add_parsers(sub)
    store.add_parsers(sub)  # store check, store repair
    view.add_parsers(sub)
    export.add_parsers(sub)  # export-lerobot
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
