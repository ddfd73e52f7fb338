"""The wire: what crosses a socket between policy, sim and robot nodes. Torch-free by contract (`make lint`).

A peer needs only numpy, pyzmq and msgpack to speak it, like openpi's client package: the LIBERO node runs
from its own environment with nothing else of this project but `vla_steer.wire` and the rollout store.

    codec       the frame format: msgpack header + one raw frame per array; strict decode, `ProtocolError`
    messages    per-kind payload schemas and their values (`Observation`, `ServerInfo`, `InferResult`, ...)
    security    CURVE keys, the client allow-list, the loopback-only bind policy
    server      `Server`: answers every request (infer/reset on a worker thread, the rest on the socket's)
    client      `Client`: timeouts, retries, late replies dropped, heartbeats behind `alive`
    telemetry   `TelemetrySubscriber`: one record per request from the server's PUB socket
    openpi      openpi's websocket protocol as a second front door of a `Server` (needs `websockets`;
                imported on its own: `from vla_steer.wire.openpi import OpenpiServer`)
"""

from vla_steer.wire.client import Client, RemoteError, RequestTimeout
from vla_steer.wire.codec import Code, Message, ProtocolError, decode, encode, require_finite
from vla_steer.wire.messages import (
    InferResult,
    KnobsRequest,
    Observation,
    ServerInfo,
    Step,
    TelemetryRecord,
    parse_setting,
    parse_strengths,
    split_setting,
)
from vla_steer.wire.security import InsecureBindError, Keypair, generate_keypair, is_loopback, load_keypair
from vla_steer.wire.server import DEFAULT_ADDRESS, Reply, Request, Server
from vla_steer.wire.telemetry import TelemetrySubscriber

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "Code",
    "InferResult",
    "InsecureBindError",
    "Keypair",
    "KnobsRequest",
    "Message",
    "Observation",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "Request",
    "RequestTimeout",
    "Server",
    "ServerInfo",
    "Step",
    "TelemetryRecord",
    "TelemetrySubscriber",
    "decode",
    "encode",
    "generate_keypair",
    "is_loopback",
    "load_keypair",
    "parse_setting",
    "parse_strengths",
    "split_setting",
    "require_finite",
]
