"""openpi's websocket protocol as a second front door of a policy node, beside its ZeroMQ socket.

What an openpi client (`openpi_client.websocket_client_policy.WebsocketClientPolicy`) expects, and gets:
on connect, one binary message with the server's metadata; then, per binary message holding a packed
observation dict (see `codec`), one binary message holding `{"actions": float32 [chunk, action_dim],
"server_timing": {"infer_ms": ...}, "steering": <the knob state in force>}`. The observation is mapped onto
our `Observation` by a `KeyMap` and answered by the node's own handler through `Server.submit`: the same
checks, the same worker (one inference at a time, whichever door it came through), the same knobs and
telemetry. A bad request is answered with a text message naming what was wrong (openpi's client raises
it as a RuntimeError) and the connection stays open; openpi's `__ctrl__` episode messages reset the
policy and are acknowledged.

Per-request steering: an observation dict may carry `"vla_steer/steer": {knob: strength, ...}` (the key
`STEER_KEY`; no key map reads it), which is that inference's whole setting, exactly as `Client.infer(obs,
steer=...)`: the named knobs at those strengths, every other one off (`{}`: unsteered), the live knobs
untouched and the reply's "steering" saying what ran. Without it the live knobs apply. Checked like the
socket's `steer` (a map of knob name -> finite number, known knobs, strengths in bounds).

Safety, as for our own socket: binds loopback unless `allow_remote=True` and a `token` are both given;
with a token, a client must send `Authorization: Api-Key TOKEN` (openpi-client's `api_key=`) or `Bearer
TOKEN`. The handshake refuses any `Origin` header not explicitly allowed (browsers always send one, so no
web page can drive the policy) and, on loopback, any `Host` that is not a loopback name (DNS rebinding).
Messages over `max_message_bytes` close that connection with 1009 (message too big); at most
`max_connections` clients at once. Nothing is ever unpickled. `/healthz` answers 200, as openpi's does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from vla_steer.wire.codec import DEFAULT_MAX_MESSAGE_BYTES, Code, ProtocolError
from vla_steer.wire.messages import ServerInfo
from vla_steer.wire.openpi.codec import pack, unpack
from vla_steer.wire.openpi.keys import KeyMap, KeyMapError
from vla_steer.wire.security import InsecureBindError
from vla_steer.wire.server import Server

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # openpi's serve_policy.py default
STEER_KEY = "vla_steer/steer"  # an observation's own steering setting (see the module's docstring)
_LOOPBACK_NAMES = ("localhost", "localhost.")


class OpenpiServer:
    """Serve `server`'s handlers over openpi's websocket protocol. Binds in the constructor (so a port in
    use fails here), serves from a thread of its own until `close()`; also a context manager."""

    def __init__(
        self,
        server: Server,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        keys: KeyMap | str = "libero",
        token: str | None = None,
        allow_remote: bool = False,
        allowed_origins: Iterable[str] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_connections: int = 8,
    ):
        loopback = is_loopback_host(host)
        if not loopback and not (allow_remote and token):
            raise InsecureBindError(
                f"refusing to serve openpi's protocol on {host!r}: anyone who can reach it could drive the "
                "policy (and the robot). Bind a loopback host, or pass both allow_remote and a token "
                "(clients send it as openpi-client's api_key); the protocol is not encrypted, so tunnel it."
            )
        if token is not None and len(token) < 16:
            raise ValueError("the openpi token must be at least 16 characters")
        self.server = server
        self.host, self.loopback = host, loopback
        self.token = token
        self.allowed_origins = frozenset(allowed_origins)
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        info = self._hello()
        self.image_shapes = {k: tuple(s) for k, s in info.image_keys.items()}
        self.state_dim = info.info.get("state_dim")
        self.keys = keys if isinstance(keys, KeyMap) else KeyMap.preset(keys, list(self.image_shapes))
        self.keys.check(list(self.image_shapes))
        self.metadata = {
            "server": "vla-steer",
            "policy": info.policy,
            "action_dim": info.action_dim,
            "chunk_length": info.chunk_length,
            "control_hz": info.control_hz,
            "action_space": info.info.get("action_space"),
            "state_dim": self.state_dim,
            "concepts": list(info.concepts),
            "keys": self.keys.describe(),
        }
        self._connections = 0
        self._requested_port = port
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(bound,), name="vla-steer-openpi", daemon=True)
        self._thread.start()
        try:
            self.port: int = bound.result(timeout=30)
        except BaseException:
            self._thread.join(5)
            self._loop.close()
            raise
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> OpenpiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event loop thread

    def _run(self, bound: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(bound))
        except BaseException as e:  # a bind error: the constructor raises it
            if not bound.done():
                bound.set_exception(e)
            else:
                log.exception("the openpi server stopped")

    async def _serve(self, bound: concurrent.futures.Future) -> None:
        from websockets.asyncio.server import serve

        self._stopped = asyncio.Event()
        async with serve(
            self._connection,
            self.host,
            self._requested_port,
            process_request=self._check_handshake,
            compression=None,  # as openpi: images do not compress, and inflating is a size-limit hazard
            max_size=self.max_message_bytes,
            max_queue=2,
            server_header="vla-steer",
        ) as ws_server:
            bound.set_result(ws_server.sockets[0].getsockname()[1])
            await self._stopped.wait()

    def _check_handshake(self, connection: Any, request: Any) -> Any:
        """Refuse browsers, foreign Host names, missing tokens and one client too many before the upgrade."""
        headers = request.headers
        for name in ("Host", "Origin", "Authorization"):
            if len(headers.get_all(name)) > 1:
                return connection.respond(http.HTTPStatus.BAD_REQUEST, f"more than one {name} header\n")
        origin = headers.get("Origin")
        if origin is not None and origin not in self.allowed_origins:
            log.warning("refused an openpi handshake from Origin %r", origin)
            return connection.respond(
                http.HTTPStatus.FORBIDDEN,
                f"Origin {origin!r} may not drive this policy (web pages may not)\n",
            )
        if self.loopback and not _is_loopback_hostport(headers.get("Host", "")):
            return connection.respond(http.HTTPStatus.FORBIDDEN, "Host must be a loopback address\n")
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.token is not None and not _authorized(headers.get("Authorization", ""), self.token):
            return connection.respond(
                http.HTTPStatus.UNAUTHORIZED, "send the token as 'Authorization: Api-Key TOKEN'\n"
            )
        if self._connections >= self.max_connections:
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"{self.max_connections} clients are connected already\n"
            )
        return None

    async def _connection(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self._connections += 1
        client = f"openpi:{ws.remote_address}".encode()
        try:
            await ws.send(pack(self.metadata))
            async for message in ws:
                await ws.send(await self._answer(message, client))
        except ConnectionClosed:
            pass
        except Exception:  # a bug here costs this connection, never the server
            log.exception("openpi connection failed")
            await ws.close(1011, "internal error")
        finally:
            self._connections -= 1

    async def _answer(self, message: bytes | str, client: bytes) -> bytes | str:
        """One request -> one reply: packed bytes, or text naming the error (openpi's error convention)."""
        if isinstance(message, str):
            return "vla-steer: [malformed] send packed observations as binary messages, not text"
        try:
            obs = unpack(message, self.max_message_bytes)
        except ProtocolError as e:
            return f"vla-steer: [{e.code}] {e.message}"
        if isinstance(obs, dict) and "__ctrl__" in obs:
            return await self._control(obs, client)
        try:
            observation = self.keys.observation(obs, self.image_shapes, self.state_dim)
        except KeyMapError as e:
            return f"vla-steer: [{Code.BAD_PAYLOAD}] {e} (keys expected: {self.keys.describe()})"
        payload: dict[str, Any] = {"observation": observation.to_payload()}
        if STEER_KEY in obs:
            steer = obs[STEER_KEY]
            if not (isinstance(steer, dict) and all(isinstance(k, str) for k in steer)):
                return (
                    f"vla-steer: [{Code.BAD_PAYLOAD}] {STEER_KEY!r} must be a map of knob name -> strength, "
                    f"got {steer!r:.200}"
                )
            payload["steer"] = steer  # its values and knob names are checked as the socket's `steer` is
        t0 = time.monotonic()
        reply = await self._submit("infer", payload, client)
        if isinstance(reply, str):
            return reply
        timing = {"infer_ms": (time.monotonic() - t0) * 1e3}
        return pack({"actions": reply["actions"], "server_timing": timing,
                     "steering": reply.get("info", {}).get("steering", {})})  # fmt: skip

    async def _control(self, obs: dict, client: bytes) -> bytes | str:
        """Newer openpi clients bracket episodes with `{"__ctrl__": "episode_start" | "episode_end"}`."""
        ctrl = obs["__ctrl__"]
        if ctrl == "episode_start":
            episode = "/".join(str(obs.get(k, "")) for k in ("__experiment__", "__task__", "__episode_id__"))
            reply = await self._submit("reset", {"episode": episode[:256]}, client)
            if isinstance(reply, str):
                return reply
        return pack({"__ack__": ctrl if ctrl in ("episode_start", "episode_end") else "ignored"})

    async def _submit(self, kind: str, payload: dict, client: bytes) -> dict | str:
        msg = await asyncio.wrap_future(self.server.submit(kind, payload, client))
        if msg.kind == "error":
            p = msg.payload
            # A request's `steer` came in under STEER_KEY here: name it as this door's clients know it.
            fld = STEER_KEY if p.get("field") == "steer" else p.get("field")
            where = f" ({fld})" if fld else ""
            return f"vla-steer: [{p['code']}] {p['message']}{where}"
        return msg.payload

    def _hello(self) -> ServerInfo:
        msg = self.server.submit("hello", {}, b"openpi").result(timeout=30)
        if msg.kind == "error":
            raise RuntimeError(f"the node's hello failed: {msg.payload['message']}")
        return ServerInfo.from_payload(msg.payload)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a name that resolves elsewhere is not trusted: give an address)."""
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_hostport(value: str) -> bool:
    """A Host header ("127.0.0.1:8000", "localhost", "[::1]:8000") naming a loopback host."""
    if value.startswith("["):
        host = value[1 : value.find("]")]
    elif value.count(":") == 1:
        host = value.split(":")[0]
    else:
        host = value
    return is_loopback_host(host)


def _authorized(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme in ("Api-Key", "Bearer") and hmac.compare_digest(given.strip().encode(), token.encode())


__all__ = ["DEFAULT_PORT", "STEER_KEY", "OpenpiServer", "is_loopback_host"]
