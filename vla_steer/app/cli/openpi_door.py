"""`vla-steer serve --openpi-port PORT`: the options of openpi's websocket front door, checked before any
weights load, and the door itself opened beside the node's ZeroMQ socket (`vla_steer.wire.openpi`)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_steer.app.cli.args import check_port_free


@dataclass(frozen=True)
class OpenpiSettings:
    host: str
    port: int
    keys: Any  # a preset name or a KeyMap
    token: str | None
    allow_remote: bool
    origins: tuple[str, ...]


def add_openpi_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "openpi websocket front door (openpi-client's WebsocketClientPolicy works unchanged)"
    )
    g.add_argument(
        "--openpi-port", type=int, help="also answer openpi's protocol on this port (0: any free one)"
    )
    g.add_argument("--openpi-host", default="127.0.0.1", help="its host (default 127.0.0.1, loopback)")
    g.add_argument(
        "--openpi-keys",
        default="libero",
        help="observation key map: libero, droid, or a YAML file {prompt, images: {our_key: openpi_key}, state}",
    )
    g.add_argument(
        "--openpi-token-file",
        type=Path,
        help="file holding a token clients must send (openpi-client api_key)",
    )
    g.add_argument(
        "--openpi-allow-remote",
        action="store_true",
        help="serve a non-loopback host (needs --openpi-token-file; the protocol is not encrypted: tunnel it)",
    )
    g.add_argument(
        "--openpi-allow-origin", action="append", default=[], metavar="ORIGIN",
        help="a browser origin allowed to connect (default: none; every web page is refused)",
    )  # fmt: skip


def openpi_settings(args: argparse.Namespace) -> OpenpiSettings | None:
    """Check the openpi options (flags, files, the port) without loading anything; None when not asked for."""
    from vla_steer.wire.openpi import PRESETS, KeyMap, is_loopback_host

    if args.openpi_port is None:
        given = [
            f for f in ("openpi_token_file", "openpi_allow_remote", "openpi_allow_origin") if getattr(args, f)
        ]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --openpi-port")
        return None
    if not 0 <= args.openpi_port <= 65535:
        raise ValueError(f"--openpi-port must be in 0..65535, got {args.openpi_port}")
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "--openpi-port needs the websockets package: pip install 'vla-steer[openpi]'"
        ) from None
    token = None
    if args.openpi_token_file is not None:
        lines = args.openpi_token_file.read_text().splitlines()  # FileNotFoundError names the file
        token = lines[0].strip() if lines else ""
        if len(token) < 16:
            raise ValueError(
                f"--openpi-token-file {args.openpi_token_file}: the token must be >= 16 characters"
            )
    remote = not is_loopback_host(args.openpi_host)
    if remote and not (args.openpi_allow_remote and token):
        raise ValueError(
            f"--openpi-host {args.openpi_host} is not loopback: anyone who can reach it could drive the policy. "
            "Pass --openpi-allow-remote AND --openpi-token-file (and tunnel it: the protocol is not encrypted)"
        )
    keys: Any = args.openpi_keys
    if keys not in PRESETS:
        from vla_steer.core.config import load_yaml

        path = Path(keys)
        if not path.is_file():
            raise FileNotFoundError(
                f"--openpi-keys: {keys!r} is neither a preset {sorted(PRESETS)} nor a file"
            )
        keys = KeyMap.from_dict(load_yaml(path), f"--openpi-keys {path}")  # a repeated key is refused
    check_port_free(f"--openpi-port {args.openpi_port} on {args.openpi_host}", args.openpi_host, args.openpi_port,
                    "choose another port, e.g. --openpi-port 8001")  # fmt: skip
    return OpenpiSettings(args.openpi_host, args.openpi_port, keys, token, args.openpi_allow_remote,
                          tuple(args.openpi_allow_origin))  # fmt: skip


@contextlib.contextmanager
def openpi_door(server: Any, settings: OpenpiSettings | None) -> Iterator[None]:
    """Serve openpi's protocol for `server` (a started `vla_steer.wire.Server`) while the block runs."""
    if settings is None:
        yield
        return
    from vla_steer.wire.openpi import OpenpiServer

    s = settings
    with OpenpiServer(server, s.host, s.port, keys=s.keys, token=s.token, allow_remote=s.allow_remote,
                      allowed_origins=s.origins) as door:  # fmt: skip
        print(f"openpi websocket on {door.url} (keys: {door.keys.describe()})", flush=True)
        yield
