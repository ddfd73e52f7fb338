"""What the wire tests share: a fake policy that answers from its requests, a server fixture, raw sockets."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import zmq

from vla_steer.wire import (
    Code,
    InferResult,
    Message,
    ProtocolError,
    Reply,
    Request,
    Server,
    ServerInfo,
    decode,
    encode,
)

LOCAL = "tcp://127.0.0.1:*"


class FakePolicy:
    """Answers from the observation so every reply can be checked against its request.

    Observation fields it understands: tag (echoed as info.tag and actions[0, 0]), hold (wait until the
    test sets `release`), nan_actions, explode (raise), bad_reply (return a malformed reply). `started` is
    set when an inference begins.
    """

    def __init__(self) -> None:
        self.strengths: dict[str, float] = {"up": 0.0, "fast": 0.0}
        self.enabled: dict[str, bool] = {"up": False, "fast": False}
        self.started = threading.Event()
        self.release = threading.Event()

    def hello(self, req: Request) -> ServerInfo:
        return ServerInfo("fake", 7, 4, 10.0, {"agentview": (8, 8, 3)}, tuple(self.strengths))

    def infer(self, req: Request) -> Reply:
        obs = req.payload["observation"]
        self.started.set()
        if obs.get("hold"):
            assert self.release.wait(30), "the test never released the held inference"
        if obs.get("explode"):
            raise RuntimeError("policy exploded")
        if obs.get("bad_reply"):
            return Reply({"actions": np.zeros(7, np.float32)})  # 1-D: not an action chunk
        tag = obs.get("tag", 0)
        actions = np.full((4, 7), float(tag), np.float32)
        if obs.get("nan_actions"):
            actions[1, 2] = np.nan
        acts = {"l15": np.arange(5, dtype=np.float32) + tag, "l20": np.zeros((2, 3), np.float16)}
        info = {"tag": tag, "echo": obs.get("echo")}
        return Reply(InferResult(actions, acts, info), telemetry={"tag": tag, "chunk": actions[0]})

    def reset(self, req: Request) -> dict[str, Any]:
        return {"info": {"episode": req.payload.get("episode"), "seed": req.payload.get("seed")}}

    def knobs(self, req: Request) -> dict[str, Any]:
        k = req.knobs
        if k.op == "set":
            for c, s in k.strengths.items():
                if c not in self.strengths:
                    raise ProtocolError(Code.BAD_PAYLOAD, f"unknown concept {c!r}", f"strengths.{c}")
                self.strengths[c] = s
        elif k.op in ("enable", "disable"):
            for c in k.concepts or ():
                self.enabled[c] = k.op == "enable"
        elif k.op == "off":
            self.enabled = dict.fromkeys(self.enabled, False)
        names = k.concepts if k.op == "get" and k.concepts else tuple(self.strengths)
        return {"knobs": {c: {"strength": self.strengths[c], "enabled": self.enabled[c]} for c in names}}


@contextlib.contextmanager
def serving(policy: Any = None, address: str = LOCAL, **kw: Any) -> Iterator[Server]:
    policy = FakePolicy() if policy is None else policy
    srv = Server(policy, address, **kw).start()
    try:
        yield srv
    finally:
        if isinstance(policy, FakePolicy):
            policy.release.set()  # an inference a failed test left held must not outlive it
        srv.close()


def raw_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def raw_exchange(sock: zmq.Socket, frames: list, timeout: float = 2.0) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), "no reply from server"
    return decode(sock.recv_multipart(copy=False))


def roundtrip(kind: str, payload: dict, **kw: Any) -> Message:
    """Encode, copy the frames to bytes as a socket would, decode."""
    return decode([bytes(memoryview(f)) for f in encode(kind, payload, **kw)])
