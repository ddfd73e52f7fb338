"""openpi's websocket policy protocol, spoken by a policy node so that openpi's clients drive it unchanged.

    codec    openpi's msgpack-with-numpy messages, decoded strictly (numeric arrays only, never pickle)
    keys     KeyMap: an openpi observation dict (LIBERO, DROID or a custom key map) -> our Observation
    server   OpenpiServer: the websocket front door, answering through the node's `Server.submit`

Needs the `websockets` package (`pip install vla-steer[openpi]`), imported only when a server starts.
"""

from vla_steer.wire.openpi.codec import pack, unpack
from vla_steer.wire.openpi.keys import PRESETS, KeyMap, KeyMapError, resize_with_pad
from vla_steer.wire.openpi.server import DEFAULT_PORT, STEER_KEY, OpenpiServer, is_loopback_host

__all__ = [
    "DEFAULT_PORT",
    "PRESETS",
    "STEER_KEY",
    "KeyMap",
    "KeyMapError",
    "OpenpiServer",
    "is_loopback_host",
    "pack",
    "resize_with_pad",
    "unpack",
]
