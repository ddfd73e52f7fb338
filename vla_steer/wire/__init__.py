"""The wire: what crosses a socket between policy, sim and robot nodes. Torch-free by contract (`make lint`).

A peer needs only numpy, pyzmq and msgpack to speak it, like openpi's client package: the LIBERO node runs
from its own environment with nothing else of this project but `vla_steer.wire` and the rollout store.
"""

from vla_steer.wire.protocol import (
    Code,
    InferResult,
    KnobsRequest,
    Message,
    ProtocolError,
    ServerInfo,
    TelemetryRecord,
    decode,
    encode,
    parse_setting,
    parse_strengths,
    require_finite,
)
from vla_steer.wire.transport import (
    DEFAULT_ADDRESS,
    Client,
    InsecureBindError,
    Keypair,
    RemoteError,
    Reply,
    Request,
    RequestTimeout,
    Server,
    TelemetrySubscriber,
    generate_keypair,
    is_loopback,
    load_keypair,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "Code",
    "InferResult",
    "InsecureBindError",
    "Keypair",
    "KnobsRequest",
    "Message",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "Request",
    "RequestTimeout",
    "Server",
    "ServerInfo",
    "TelemetryRecord",
    "TelemetrySubscriber",
    "decode",
    "encode",
    "generate_keypair",
    "is_loopback",
    "load_keypair",
    "parse_setting",
    "parse_strengths",
    "require_finite",
]
