"""Argument helpers shared by the subcommands: value parsers, config names, key options, run options."""

from __future__ import annotations

import argparse
import math
import re
import socket
from collections.abc import Callable
from pathlib import Path

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


def config_path(group: str) -> Callable[[str], Path]:
    """An argparse type: a config file's path, or the name of a shipped config of `group` ("demo_vla")."""

    def parse(text: str) -> Path:
        from vla_steer.core.config import resolve_config  # lazy: `vla-steer --help` stays fast

        try:
            return resolve_config(text, group)
        except FileNotFoundError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def parse_option(text: str) -> tuple[str, object]:
    """'unnorm_key=bridge_orig' -> ('unnorm_key', 'bridge_orig'); the value is read as YAML (true, 3, [a, b])."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. unnorm_key=bridge_orig), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not a YAML scalar or list") from None


POLICY_HELP = (
    "a policy config (a YAML file, or a shipped one's name: demo_vla, openvla_7b, pi0_libero, ...), a checkpoint "
    "directory (the demo VLA's, OpenVLA's official layout, pi0's or pi0.5's LeRobot or openpi layout) or a hub id"
)


def add_policy_argument(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """How every command takes a policy (`policies.resolve`): config, checkpoint directory or hub id."""
    if positional:
        p.add_argument("policy", metavar="POLICY", help=POLICY_HELP + "; a plain transformers LM works too")
    else:
        p.add_argument("--policy", required=True, help=POLICY_HELP)
    p.add_argument(
        "-o",
        "--option",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="a policy config option (e.g. unnorm_key=bridge_orig, center_crop=true, seed=0); repeatable",
    )
    p.add_argument(
        "--kind",
        choices=("tiny_vla", "openvla", "pi0", "pi05", "language_model"),
        help="what the checkpoint is, where its files cannot say (a hub id offline); default: read from them",
    )


def add_security(p: argparse.ArgumentParser, server: bool) -> None:
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


def add_run_options(p: argparse.ArgumentParser) -> None:
    """What every simulated run takes beside its environments and steering settings (`sim`, `eval`)."""
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy node's address")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task and setting")
    p.add_argument(
        "--max-steps", type=int, help="executed steps per episode (default 200; LIBERO: its suite's limit)"
    )
    p.add_argument(
        "--execute-steps", type=int, help="actions executed per chunk before re-planning (default: all)"
    )
    p.add_argument(
        "--activations", default="", help="comma-separated concepts or layer:N to record with every step"
    )
    p.add_argument("--out", type=Path, required=True, help="rollout store directory (appended to)")
    p.add_argument(
        "--seed",
        type=int,
        help="episode i of every setting uses seed + i (default: 0, or the LIBERO configs' first_seed)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for one reply from the node (default 5; a 7B model on a CPU needs more)",
    )
    p.add_argument(
        "--video", metavar="CAMERA", help="also write an mp4 per episode from this camera (e.g. agentview)"
    )
    add_security(p, server=False)


def check_port_free(what: str, host: str, port: int, hint: str) -> None:
    """Refuse a TCP port that cannot be listened on, naming the flag (`what`): before any weights load or
    anything connects. Port 0 (the OS picks) and ``*`` (every interface) are understood."""
    if port == 0:
        return
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ and http.server bind
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"{what}: cannot listen there ({e.strerror or e}); {hint}") from None
