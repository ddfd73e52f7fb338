"""Who may talk to a node: CURVE keypairs, the client allow-list, the bind policy, and the socket options
every wire socket gets.

Binding anything but loopback/ipc/inproc requires CURVE keys (server keypair + allow-list of client public
keys, checked by a ZAP authenticator) unless `allow_insecure=True`: whoever reaches this socket can drive a
robot. Every socket also gets a hard per-frame size cap (a peer beyond it is disconnected) and ZMTP
heartbeats (a dead TCP peer is dropped within a second).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

log = logging.getLogger(__name__)

_ZMQ_HEARTBEAT_MS = 250  # ZMTP-level pings: dead TCP peers are dropped after _ZMQ_HEARTBEAT_TIMEOUT_MS
_ZMQ_HEARTBEAT_TIMEOUT_MS = 1000
_COPY_THRESHOLD = 1 << 20  # bytes; frames up to this size are copied when sent (see socket_options)


class InsecureBindError(ValueError):
    """Refused to bind a non-loopback address without CURVE keys."""


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair in Z85 (40 ASCII bytes each). `secret` is None for a peer's public key."""

    public: bytes
    secret: bytes | None = None


def generate_keypair(
    directory: str | os.PathLike, name: str, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write `<name>.key` (public, share it) and `<name>.key_secret` (mode 0600) into `directory`.

    Refuses (FileExistsError, nothing written) to replace an existing key file unless `overwrite`: a lost
    secret key locks its peers out until every allow-list is redone.
    """
    directory = Path(directory)
    existing = [p for p in (directory / f"{name}.key", directory / f"{name}.key_secret") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; a new keypair would replace it")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(path: str | os.PathLike) -> Keypair:
    """Load a key file written by `generate_keypair` (a `.key_secret` file gives both halves)."""
    public, secret = zmq.auth.load_certificate(path)
    return Keypair(public, secret)


def as_keypair(key: Keypair | str | os.PathLike, need_secret: bool, what: str) -> Keypair:
    kp = key if isinstance(key, Keypair) else load_keypair(key)
    if need_secret and not kp.secret:
        raise ValueError(f"{what} needs a secret key; pass the .key_secret file or a Keypair with secret")
    return kp


def public_key(key: bytes | str | os.PathLike | Keypair) -> bytes:
    """Accept a Z85 key (bytes/str), a raw 32-byte key, a Keypair or a key file path."""
    if isinstance(key, Keypair):
        return key.public
    if isinstance(key, bytes) and len(key) == 32:
        return zmq.utils.z85.encode(key)
    if isinstance(key, bytes) and len(key) == 40:
        return key
    if isinstance(key, str) and len(key) == 40 and not os.path.exists(key):
        return key.encode("ascii")
    return load_keypair(key).public


def load_allow_list(allowed: Any) -> frozenset[bytes]:
    if isinstance(allowed, (str, os.PathLike)) and Path(allowed).is_dir():
        return frozenset(zmq.auth.load_certificates(allowed))
    if isinstance(allowed, (str, bytes, os.PathLike, Keypair)):
        return frozenset({public_key(allowed)})
    return frozenset(public_key(k) for k in allowed)


class AllowList:
    """ZAP credentials provider: a client is served only if its public key is on the list."""

    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            log.warning("refused CURVE client with unknown public key %s", key.decode("ascii", "replace"))
        return ok


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host (127.0.0.0/8, ::1, localhost)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, host names
        return False


def _is_ipv6(address: str) -> bool:
    """True for a tcp:// address whose host is an IPv6 literal ("tcp://[::1]:5555")."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        return True
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def check_bind(address: str, secure: bool, allow_insecure: bool) -> None:
    if secure or allow_insecure or is_loopback(address):
        return
    raise InsecureBindError(
        f"refusing to bind {address!r} without CURVE keys: anyone who can reach it could drive the policy "
        "(and the robot). Pass keypair=... and allowed_clients=... (see vla_steer.wire.generate_keypair), "
        "bind a loopback address, or pass allow_insecure=True to accept the risk."
    )


def socket_options(sock: zmq.Socket, max_bytes: int, address: str | None = None) -> None:
    sock.linger = 0
    # Frames up to 1 MiB (camera images) are copied when sent (~25 us): a zero-copy send costs a wake-up of
    # pyzmq's garbage-collector thread per frame, which then competes for the GIL on the reply path.
    sock.copy_threshold = _COPY_THRESHOLD
    if address is not None and _is_ipv6(address):
        sock.ipv6 = True  # zmq sockets are IPv4-only unless told otherwise ("No such device" on bind)
    # Hard cap per frame (zmq checks a frame's length prefix and disconnects the peer before buffering it).
    # libzmq has no cap on a whole multipart message: the Server sums frames as it reads them (see there).
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMQ_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMQ_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, _ZMQ_HEARTBEAT_TIMEOUT_MS)
