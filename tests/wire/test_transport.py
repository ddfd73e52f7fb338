"""Server/Client/telemetry over real ZeroMQ sockets: 127.0.0.1 with ephemeral ports, and ipc in a tmp dir.

Every blocking call here has a timeout; the waits are polls with deadlines, never fixed long sleeps.
"""

from __future__ import annotations

import contextlib
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vla_steer.wire import (
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
from vla_steer.wire.protocol import (
    ALLOWED_DTYPES,
    Code,
    InferResult,
    KnobsRequest,
    Message,
    ProtocolError,
    ServerInfo,
    decode,
    encode,
)

LOCAL = "tcp://127.0.0.1:*"


class FakePolicy:
    """Answers from the observation so every reply can be checked against its request.

    Observation fields it understands: tag (echoed as info.tag and actions[0, 0]), delay (seconds to
    sleep), nan_actions, explode (raise), bad_reply (return a malformed reply).
    """

    def __init__(self) -> None:
        self.strengths: dict[str, float] = {"up": 0.0, "fast": 0.0}
        self.enabled: dict[str, bool] = {"up": False, "fast": False}
        self.started = threading.Event()

    def hello(self, req: Request) -> ServerInfo:
        return ServerInfo("fake", 7, 4, 10.0, {"agentview": (8, 8, 3)}, tuple(self.strengths))

    def infer(self, req: Request) -> Reply:
        obs = req.payload["observation"]
        self.started.set()
        if obs.get("delay"):
            time.sleep(obs["delay"])
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
    srv = Server(policy if policy is not None else FakePolicy(), address, **kw).start()
    try:
        yield srv
    finally:
        srv.close()


def wait_for(cond: Any, timeout: float, step: float = 0.01) -> float:
    """Poll `cond` until true; returns seconds waited. Fails the test after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - t0


def raw_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def raw_exchange(sock: zmq.Socket, frames: list, timeout: float = 2.0) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), "no reply from server"
    return decode(sock.recv_multipart(copy=False))


# ----------------------------------------------------------------------------------------- basics


def test_every_kind_round_trips() -> None:
    with serving() as srv, Client(srv.address) as c:
        info = c.hello()
        assert (info.policy, info.action_dim, info.chunk_length, info.image_keys) == (
            "fake",
            7,
            4,
            {"agentview": (8, 8, 3)},
        )
        res = c.infer({"tag": 3, "agentview": np.zeros((8, 8, 3), np.uint8)})
        assert res.actions.shape == (4, 7) and res.actions[0, 0] == 3 and res.info["tag"] == 3
        assert res.activations == {}  # none requested, none sent
        assert c.reset(episode="ep1", seed=5) == {"info": {"episode": "ep1", "seed": 5}}
        assert c.set_knobs({"up": 4.0})["up"]["strength"] == 4.0
        assert c.enable(["up"])["up"]["enabled"] is True
        assert set(c.get_knobs(["fast"])) == {"fast"}
        assert c.disable(["up"])["up"]["enabled"] is False
        assert set(c.list_knobs()) == {"up", "fast"}
        c.enable(["fast"])
        assert not any(s["enabled"] for s in c.knobs_off().values())
        assert c.ping() is not None
        assert c.wait_alive(2.0)


def test_arrays_of_every_dtype_cross_the_wire_bit_exact() -> None:
    rng = np.random.default_rng(0)
    echo = {}
    for dt in sorted(ALLOWED_DTYPES):
        for shape in [(), (0,), (5,), (2, 3, 4)]:
            n = int(np.prod(shape)) * np.dtype(dt).itemsize
            raw = rng.integers(0, 256, n, dtype=np.uint8)
            echo[f"{dt}_{len(shape)}_{n}"] = (raw & 1 if dt == "bool" else raw).view(dt).reshape(shape)
    echo["big"] = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    echo["nested"] = {"deeper": [np.arange(3, dtype=np.int64), "s", 1.5]}
    # Random float bits include NaN and inf: turn the observation finiteness check off to carry them.
    with serving(require_finite_observations=False) as srv, Client(srv.address) as c:
        got = c.infer({"tag": 1, "echo": echo}).info["echo"]
    for k, v in echo.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
    assert got["nested"]["deeper"][1:] == ["s", 1.5]
    np.testing.assert_array_equal(got["nested"]["deeper"][0], np.arange(3))


def test_activations_are_bounded_to_the_requested_names() -> None:
    with serving() as srv, Client(srv.address) as c:
        res = c.infer({"tag": 2}, activations=["l15", "missing"])
    assert set(res.activations) == {"l15"}
    np.testing.assert_array_equal(res.activations["l15"], np.arange(5, dtype=np.float32) + 2)


def test_handler_errors_become_error_replies_and_serving_goes_on() -> None:
    with serving(worker_kinds=("infer",)) as srv, Client(srv.address) as c:
        with pytest.raises(RemoteError) as e:
            c.infer({"explode": True})
        assert e.value.code == Code.HANDLER_ERROR and "policy exploded" in e.value.message
        with pytest.raises(RemoteError) as e:
            c.infer({"bad_reply": True})
        assert e.value.code == Code.HANDLER_ERROR and "invalid reply" in e.value.message
        with pytest.raises(RemoteError) as e:
            c.set_knobs({"sideways": 1.0})
        assert (e.value.code, e.value.field) == (Code.BAD_PAYLOAD, "strengths.sideways")
        with pytest.raises(RemoteError) as e:
            c.infer({"state": np.array([0.0, np.nan])})
        assert (e.value.code, e.value.field) == (Code.NOT_FINITE, "observation.state")
        with pytest.raises(ProtocolError) as e2:  # the client refuses NaN actions
            c.infer({"nan_actions": True})
        assert (e2.value.code, e2.value.field) == (Code.NOT_FINITE, "actions")
        assert c.infer({"tag": 9}).info["tag"] == 9


def test_missing_handler_is_unsupported() -> None:
    with serving({"infer": FakePolicy().infer}) as srv, Client(srv.address) as c:
        with pytest.raises(RemoteError) as e:
            c.hello()
        assert e.value.code == Code.UNSUPPORTED and e.value.field == "kind"
        assert c.infer({"tag": 1}).info["tag"] == 1
    with pytest.raises(ValueError, match="teleport"):
        Server({"teleport": print}, LOCAL)


class FakeRobotControl:
    """A robot node's control socket: ops that change and report a latched stop, and recorded events."""

    def __init__(self) -> None:
        self.stopped = False
        self.events: list[dict[str, Any]] = []

    def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "stop":
            self.stopped = True
        elif op == "resume":
            self.stopped = False
        elif op == "event":
            self.events.append(args)
        elif op != "status":
            raise ProtocolError(Code.BAD_PAYLOAD, f"unknown control op {op!r}", "op")
        return {"status": {"stopped": self.stopped, "events": len(self.events)}}


def test_control_requests_reach_the_handlers_control_method() -> None:
    robot = FakeRobotControl()
    with serving(robot) as srv, Client(srv.address) as c:
        assert c.control("status") == {"status": {"stopped": False, "events": 0}}
        assert c.control("stop")["status"]["stopped"] is True and robot.stopped
        reply = c.control("event", kind="knobs", data={"up": 4.0}, t=1.5)
        assert reply == {"status": {"stopped": True, "events": 1}}
        assert robot.events == [{"kind": "knobs", "data": {"up": 4.0}, "t": 1.5}]
        assert c.control("resume")["status"]["stopped"] is False
        with pytest.raises(RemoteError) as e:
            c.control("teleport")
        assert (e.value.code, e.value.field) == (Code.BAD_PAYLOAD, "op")
        with pytest.raises(RemoteError) as e:  # a robot control socket serves no policy
            c.hello()
        assert e.value.code == Code.UNSUPPORTED
        assert c.control("status")["status"]["stopped"] is False  # and it goes on serving


def test_control_is_unsupported_without_a_control_method_and_bad_payloads_are_refused() -> None:
    with serving() as srv, Client(srv.address) as c:
        with pytest.raises(RemoteError) as e:
            c.control("stop")
        assert (e.value.code, e.value.field) == (Code.UNSUPPORTED, "kind")
    with serving(FakeRobotControl()) as srv, Client(srv.address) as c:
        for payload, code, field in [
            ({"op": "", "args": {}}, Code.BAD_PAYLOAD, "op"),
            ({"op": "stop", "args": "now"}, Code.BAD_PAYLOAD, "args"),
            ({"op": "stop"}, Code.MISSING_FIELD, "args"),
            ({"op": "event", "args": {"frame": np.zeros(3)}}, Code.BAD_PAYLOAD, "args"),
        ]:
            with pytest.raises(RemoteError) as e:
                c.request("control", payload)
            assert (e.value.code, e.value.field) == (code, field), payload
        assert c.control("status") == {"status": {"stopped": False, "events": 0}}


def test_a_control_handler_that_returns_no_map_is_a_handler_error() -> None:
    with (
        serving({"control": lambda op, args: None if op == "quiet" else [op]}) as srv,
        Client(srv.address) as c,
    ):
        assert c.control("quiet") == {}
        with pytest.raises(RemoteError) as e:
            c.control("list")
        assert e.value.code == Code.HANDLER_ERROR


def _has_ipv6_loopback() -> bool:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger, sock.ipv6 = 0, True
        try:
            sock.bind("tcp://[::1]:*")
        except zmq.ZMQError:
            return False
        return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback_addresses_work() -> None:
    with (
        serving(address="tcp://[::1]:*", telemetry_address="tcp://[::1]:*") as srv,
        Client(srv.address) as c,
        TelemetrySubscriber(srv.telemetry_address) as sub,
    ):
        assert srv.address.startswith("tcp://[::1]:")
        assert c.hello().policy == "fake"
        assert c.wait_alive(2.0)
        wait_for(lambda: c.infer({"tag": 6}).info["tag"] == 6 and sub.recv(timeout=0.2) is not None, 3.0)


def test_ipc_addresses_work(tmp_path: Path) -> None:
    with serving(address=f"ipc://{tmp_path}/policy.sock") as srv, Client(srv.address) as c:
        assert srv.address.startswith("ipc://")
        assert c.infer({"tag": 8}).info["tag"] == 8


def test_req_sockets_work_too() -> None:
    with serving() as srv, zmq.Context() as ctx:
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(srv.address)
        req.send_multipart(encode("heartbeat", {}, request_id=5))
        assert req.poll(2000)
        msg = decode(req.recv_multipart())
        assert (msg.kind, msg.request_id) == ("heartbeat", 5)
        req.close()


# ------------------------------------------------------------------------------------- concurrency


def test_eight_clients_two_hundred_requests_each_get_their_own_replies() -> None:
    errors: list[str] = []

    def run(i: int, address: str) -> None:
        with Client(address, timeout=5.0, name=f"sim-{i}") as c:
            for j in range(200):
                tag = i * 1000 + j
                res = c.infer({"tag": tag, "echo": np.full(16, tag, np.int32)}, activations=["l15"])
                if res.info["tag"] != tag or res.actions[0, 0] != tag or res.info["echo"][0] != tag:
                    errors.append(f"client {i} request {j} got {res.info['tag']}")
                if res.activations["l15"][0] != tag:
                    errors.append(f"client {i} request {j}: wrong activations")

    with serving() as srv:
        threads = [threading.Thread(target=run, args=(i, srv.address)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]


def test_one_client_shared_by_threads_is_serialized() -> None:
    errors: list[int] = []
    with serving() as srv, Client(srv.address) as c:

        def run(i: int) -> None:
            for j in range(50):
                if c.infer({"tag": i * 100 + j}).info["tag"] != i * 100 + j:
                    errors.append(i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors and c.stale_replies == 0


def test_slow_infer_does_not_delay_control_messages() -> None:
    policy = FakePolicy()
    with serving(policy) as srv, Client(srv.address) as sim, Client(srv.address) as ui:
        done = threading.Event()

        def slow() -> None:
            sim.infer({"tag": 1, "delay": 1.0})
            done.set()

        t = threading.Thread(target=slow)
        t.start()
        assert policy.started.wait(2.0)
        ui.set_knobs({"up": 2.0})
        assert ui.ping() is not None
        ui.hello()
        # Starved control would have waited out the 1 s inference: all three answered while it ran.
        assert not done.is_set(), "the slow inference finished before the control replies"
        assert sim.alive  # the heartbeat thread kept hearing back during the inference
        t.join(5)
        assert done.is_set()


def test_full_inference_queue_answers_busy() -> None:
    policy = FakePolicy()
    with serving(policy, max_pending=1) as srv, Client(srv.address) as a, Client(srv.address) as b:
        t = threading.Thread(target=a.infer, args=({"delay": 0.3},))
        t.start()
        assert policy.started.wait(2.0)
        with pytest.raises(RemoteError) as e:
            b.infer({"tag": 1})
        assert e.value.code == Code.BUSY
        t.join(5)
        assert b.infer({"tag": 2}).info["tag"] == 2


# -------------------------------------------------------------------------------- malformed input

MAX_BYTES = 64 * 1024
GOOD_OBS = {"img": np.ones((2, 3), np.float32)}


def _good(kind: str = "infer", rid: int = 1) -> list[bytes]:
    payload = {"observation": GOOD_OBS} if kind == "infer" else {}
    return [bytes(memoryview(f)) for f in encode(kind, payload, request_id=rid)]


def _rehead(frames: list[bytes], **changes: Any) -> list[bytes]:
    h = msgpack.unpackb(frames[0], raw=False)
    h.update(changes)
    return [msgpack.packb(h), *frames[1:]]


def _entry(dtype: str, shape: list[int]) -> list:
    return [[["observation", "img"], dtype, shape]]


ANY = None  # random garbage: any error code will do, as long as it is an error reply

malformed_cases = st.one_of(
    st.binary(min_size=1, max_size=48).map(lambda b: ([b], ANY, None)),
    st.lists(st.binary(min_size=1, max_size=16), min_size=2, max_size=4).map(lambda fs: (fs, ANY, None)),
    st.integers(1, 200).map(lambda n: ([_good()[0][:-n] or b"\xc1", _good()[1]], Code.MALFORMED, "header")),
    st.integers(1, 23).map(lambda n: ([_good()[0], _good()[1][:-n]], Code.BUFFER_SIZE, "observation.img")),
    st.just((_good()[:1], Code.FRAME_COUNT, "arrays")),
    st.integers(1, 3).map(lambda n: ([*_good(), *[b"xx"] * n], Code.FRAME_COUNT, "arrays")),
    st.sampled_from(["complex64", "object", "O", "<U4", "float128", "int128", "V8", ""]).map(
        lambda d: (_rehead(_good(), arrays=_entry(d, [2, 3])), Code.BAD_DTYPE, "observation.img")
    ),
    st.lists(st.integers(1, 9), min_size=1, max_size=3)
    .filter(lambda s: int(np.prod(s)) != 6)
    .map(lambda s: (_rehead(_good(), arrays=_entry("float32", s)), Code.BUFFER_SIZE, "observation.img")),
    st.lists(st.integers(-(2**40), -1), min_size=1, max_size=3).map(
        lambda s: (_rehead(_good(), arrays=_entry("float32", s)), Code.BAD_SHAPE, "observation.img")
    ),
    st.tuples(st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 5)).map(
        lambda v: (
            _good_with(img=np.insert(np.ones(5, np.float32), v[1], v[0]).reshape(2, 3)),
            Code.NOT_FINITE,
            "observation.img",
        )
    ),
    st.integers(1, MAX_BYTES).map(  # beyond 2x the limit the peer is cut off instead (see below)
        lambda n: (_good_with(pad=np.zeros(MAX_BYTES + n, np.uint8)), Code.TOO_LARGE, None)
    ),
    st.one_of(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != 1), st.text(max_size=4), st.none()).map(
        lambda v: (_rehead(_good(), version=v), Code.BAD_VERSION, "version")
    ),
    st.text(max_size=12)
    .filter(lambda k: k not in ("infer", "hello", "reset", "knobs", "heartbeat"))
    .map(lambda k: (_rehead(_good(), kind=k), Code.BAD_KIND, "kind")),
)


def _good_with(**obs: Any) -> list[bytes]:
    frames = encode("infer", {"observation": {**GOOD_OBS, **obs}}, request_id=1, max_bytes=2**30)
    return [bytes(memoryview(f)) for f in frames]


@pytest.fixture(scope="module")
def small_server() -> Iterator[Server]:
    with serving(max_message_bytes=MAX_BYTES) as srv:
        yield srv


def test_malformed_input_gets_named_error_replies_and_serving_goes_on(small_server: Server) -> None:
    with zmq.Context() as ctx:
        sock = raw_socket(ctx, small_server.address)
        seen: set[str] = set()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=malformed_cases)
        def check(case: tuple[list[bytes], str | None, str | None]) -> None:
            frames, code, field = case
            reply = raw_exchange(sock, frames)
            assert reply.kind == "error", reply
            assert reply.payload["message"]
            if code is not None:
                assert reply.payload["code"] == code, reply.payload
                assert reply.request_id == 1 or code == Code.MALFORMED  # the id is echoed when readable
            if field is not None:
                assert reply.payload["field"] == field, reply.payload
                assert field in reply.payload["message"] or field in ("header", "arrays", "kind", "version")
            seen.add(reply.payload["code"])
            ok = raw_exchange(sock, _good("heartbeat", rid=2))  # and the server keeps serving
            assert (ok.kind, ok.request_id) == ("heartbeat", 2)

        check()
        sock.close()
    assert {Code.MALFORMED, Code.FRAME_COUNT, Code.BAD_DTYPE, Code.NOT_FINITE, Code.TOO_LARGE} <= seen
    with Client(small_server.address) as c:
        assert c.infer({"tag": 7}).info["tag"] == 7


def test_oversize_request_from_a_client_gets_a_too_large_error(small_server: Server) -> None:
    with Client(small_server.address, retries=0) as c:
        with pytest.raises(RemoteError) as e:
            c.infer({"img": np.zeros(2 * MAX_BYTES, np.uint8)})
        assert e.value.code == Code.TOO_LARGE and str(MAX_BYTES) in e.value.message
        assert c.infer({"tag": 3}).info["tag"] == 3


def test_a_frame_far_beyond_the_limit_disconnects_the_peer_and_serving_goes_on(small_server: Server) -> None:
    # zmq's MAXMSGSIZE hard cap drops the connection before the server could even read the frame.
    with Client(small_server.address, max_message_bytes=2**30, timeout=0.3, retries=0) as c:
        with pytest.raises(RequestTimeout):
            c.infer({"img": np.zeros(4 * MAX_BYTES, np.uint8)})
        assert c.infer({"tag": 4}, timeout=2.0).info["tag"] == 4


def test_requests_that_are_not_requests_are_refused(small_server: Server) -> None:
    with zmq.Context() as ctx:
        sock = raw_socket(ctx, small_server.address)
        for kind, payload, code, field in [
            ("error", {"code": "x", "message": "y"}, Code.BAD_KIND, "kind"),
            ("infer", {}, Code.MISSING_FIELD, "observation"),
            ("knobs", {"op": "explode"}, Code.BAD_PAYLOAD, "op"),
        ]:
            reply = raw_exchange(sock, encode(kind, payload, request_id=11))
            assert (reply.kind, reply.request_id, reply.payload["code"], reply.payload["field"]) == (
                "error",
                11,
                code,
                field,
            )
        sock.close()


# ------------------------------------------------------------------------------- liveness, restarts


def test_dead_server_is_reported_within_the_liveness_window_and_recovery_follows() -> None:
    policy = FakePolicy()
    srv = Server(policy, LOCAL).start()
    address = srv.address
    with Client(address, timeout=0.5, retries=1, liveness=1.0) as c:
        try:
            assert c.wait_alive(2.0)
            assert c.infer({"tag": 1}).info["tag"] == 1
            srv.close()
            dead_after = wait_for(lambda: not c.alive, timeout=2.0)
            assert dead_after <= 1.0 + 0.4  # liveness window + one heartbeat interval + slack
            with pytest.raises(RequestTimeout):
                c.infer({"tag": 2}, timeout=0.2, retries=0)
            srv = Server(policy, address).start()  # same address
            wait_for(lambda: c.alive, timeout=3.0)
            assert c.infer({"tag": 3}).info["tag"] == 3
        finally:
            srv.close()


@pytest.mark.parametrize("reconnect", [True, False])
def test_a_late_reply_is_never_returned_for_a_new_request(reconnect: bool) -> None:
    with (
        serving() as srv,
        Client(
            srv.address, timeout=0.2, retries=0, reconnect_on_timeout=reconnect, heartbeat_interval=None
        ) as c,
    ):
        with pytest.raises(RequestTimeout):
            c.infer({"tag": 1, "delay": 0.5})
        res = c.infer({"tag": 2}, timeout=3.0)  # queued behind the slow one; its reply comes first
        assert res.info["tag"] == 2 and res.actions[0, 0] == 2
        # Without reconnecting, the stale reply reached this socket and was dropped by id; with it, the
        # old socket is gone and the server's reply to it went nowhere.
        assert c.stale_replies == (0 if reconnect else 1)


def test_retries_recover_from_a_slow_first_attempt() -> None:
    calls: list[float] = []
    policy = FakePolicy()

    def infer(req: Request) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(0.3)
        return policy.infer(req)

    with serving({"infer": infer}) as srv, Client(srv.address, timeout=0.25) as c:
        assert c.infer({"tag": 4}, retries=2).info["tag"] == 4  # infer retries only when asked to
    assert len(calls) >= 2


def test_a_slow_infer_is_not_retried_by_default() -> None:
    """An inference is not idempotent: with the client's default retries it still runs exactly once."""
    calls: list[float] = []
    policy = FakePolicy()

    def infer(req: Request) -> Any:
        calls.append(time.monotonic())
        time.sleep(0.4)
        return policy.infer(req)

    with serving({"infer": infer, "hello": policy.hello}) as srv, Client(srv.address, timeout=0.2) as c:
        assert c.retries == 2  # the client's retries apply to the other kinds
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="1 attempts"):
            c.infer({"tag": 1})
        assert time.monotonic() - t0 < 0.35
        time.sleep(0.5)  # a retry, had there been one, would have reached the handler by now
        assert len(calls) == 1
        assert c.hello().policy == "fake"


def test_nothing_listening_times_out_in_bounded_time() -> None:
    with Client("tcp://127.0.0.1:1", timeout=0.1, retries=2, heartbeat_interval=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="3 attempts"):
            c.hello()
        assert time.monotonic() - t0 < 1.0
        assert not c.alive and c.ping(0.05) is None
    with pytest.raises(ValueError):
        Client(timeout=float("inf"))


def test_server_sees_clients_come_and_go() -> None:
    with serving() as srv:
        c = Client(srv.address, name="sim-A")
        try:
            wait_for(lambda: "sim-A" in srv.live_clients(), timeout=2.0)
        finally:
            c.close()
        gone_after = wait_for(lambda: "sim-A" not in srv.live_clients(), timeout=2.0)
        assert gone_after <= 1.0 + 0.3  # the liveness window, counted from the last heartbeat, + slack
        assert srv.clients()["sim-A"] > 1.0


def test_the_heartbeat_table_forgets_old_names_and_stays_bounded() -> None:
    with serving(liveness=0.1, max_clients=8) as srv, zmq.Context() as ctx:
        assert srv.forget_clients_after == pytest.approx(1.0)  # 10 x liveness by default
        sock = raw_socket(ctx, srv.address)
        try:
            for i in range(20):  # names are the peer's to choose: any number of them
                assert raw_exchange(
                    sock, encode("heartbeat", {"client": f"c{i}"}, request_id=i + 1)
                ).kind == ("heartbeat")
            assert sorted(srv.clients(), key=lambda n: int(n[1:])) == [f"c{i}" for i in range(12, 20)]
            raw_exchange(sock, encode("heartbeat", {"client": "c12"}, request_id=99))  # c12 is fresh again
            raw_exchange(sock, encode("heartbeat", {"client": "new"}, request_id=100))
            assert "c12" in srv.clients() and "c13" not in srv.clients()  # the longest silent went
            raw_exchange(sock, encode("heartbeat", {"client": "x" * 10_000}, request_id=101))
            assert max(map(len, srv.clients())) <= 256
            wait_for(lambda: not srv.clients(), timeout=3.0)  # all forgotten after 1 s of silence
        finally:
            sock.close()


def test_close_is_idempotent_and_releases_the_address() -> None:
    srv = Server(FakePolicy(), LOCAL).start()
    address = srv.address
    srv.close()
    srv.close()
    with serving(address=address) as again, Client(again.address) as c:
        assert c.hello().policy == "fake"
        c.close()
        c.close()
        with pytest.raises(RuntimeError):
            c.hello()


# ------------------------------------------------------------------------------------------ security


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, where in [("server", "server"), ("alice", "allowed"), ("mallory", "other")]:
        out[f"{name}.pub"], out[f"{name}.sec"] = generate_keypair(tmp_path / where, name)
    out["allowed"] = tmp_path / "allowed"
    return out


def test_curve_serves_allowed_clients_only(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(keys["alice.sec"].stat().st_mode) == 0o600
    with serving(keypair=keys["server.sec"], allowed_clients=keys["allowed"], telemetry_address=LOCAL) as srv:
        server_pub = keys["server.pub"]
        with Client(srv.address, server_key=server_pub, keypair=keys["alice.sec"]) as alice:
            assert alice.infer({"tag": 5}).info["tag"] == 5
            assert alice.wait_alive(2.0)
        with Client(
            srv.address, server_key=server_pub, keypair=keys["mallory.sec"], timeout=0.3, retries=0
        ) as mallory:
            with pytest.raises(RequestTimeout):
                mallory.hello()
            assert not mallory.alive
        plaintext = Client(srv.address, timeout=0.3, retries=0, heartbeat_interval=None)
        with plaintext, pytest.raises(RequestTimeout):
            plaintext.hello()
        # Telemetry is encrypted and authenticated the same way.
        with (
            TelemetrySubscriber(
                srv.telemetry_address, server_key=server_pub, keypair=keys["alice.sec"]
            ) as sub,
            Client(srv.address, server_key=server_pub, keypair=keys["alice.sec"]) as alice,
        ):
            wait_for(lambda: (alice.hello(), sub.recv(0.05))[1] is not None, timeout=3.0)


def test_curve_allow_list_accepts_keys_in_memory(keys: dict[str, Path]) -> None:
    alice = load_keypair(keys["alice.sec"])
    assert alice.secret is not None
    server = load_keypair(keys["server.sec"])
    with (
        serving(keypair=server, allowed_clients=[alice.public.decode()]) as srv,
        Client(srv.address, server_key=Keypair(server.public), keypair=alice) as c,
    ):
        assert c.hello().policy == "fake"


def test_binding_beyond_loopback_needs_keys_or_explicit_consent(keys: dict[str, Path]) -> None:
    with pytest.raises(InsecureBindError, match="allow_insecure=True"):
        Server(FakePolicy(), "tcp://0.0.0.0:*")
    with pytest.raises(InsecureBindError, match="without CURVE keys"):
        Server(FakePolicy(), LOCAL, telemetry_address="tcp://*:*")
    Server(FakePolicy(), "tcp://0.0.0.0:*", allow_insecure=True).close()
    Server(
        FakePolicy(), "tcp://0.0.0.0:*", keypair=keys["server.sec"], allowed_clients=keys["allowed"]
    ).close()
    with pytest.raises(ValueError, match="allowed_clients"):
        Server(FakePolicy(), LOCAL, keypair=keys["server.sec"])


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/x.sock", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://eth0:5555", False),
        ("ws://127.0.0.1:5555", False),
    ],
)
def test_is_loopback(address: str, local: bool) -> None:
    assert is_loopback(address) is local


# ----------------------------------------------------------------------------------------- telemetry


def test_telemetry_subscriber_receives_per_request_records() -> None:
    with (
        serving(telemetry_address=LOCAL) as srv,
        TelemetrySubscriber(srv.telemetry_address) as sub,
        Client(srv.address) as c,
    ):
        # PUB/SUB: records published before the subscription lands are lost; probe until one arrives.
        wait_for(lambda: (c.hello(), sub.recv(0.05))[1] is not None, timeout=3.0)
        sub.drain()
        for tag in range(5):
            c.infer({"tag": tag})
        with pytest.raises(RemoteError):
            c.knobs(KnobsRequest("explode"))
        records = []
        while len(records) < 6 and (rec := sub.recv(2.0)) is not None:
            records.append(rec)
    infers = [r for r in records if r.kind == "infer"]
    assert [r.telemetry["tag"] for r in infers] == list(range(5))
    np.testing.assert_array_equal(infers[2].telemetry["chunk"], np.full(7, 2.0, np.float32))
    for r in infers:
        assert r.ok and r.error_code is None
        assert set(r.latency_ms) == {"decode", "queue", "handler", "encode", "total"}
        assert all(v >= 0 for v in r.latency_ms.values())
        assert r.latency_ms["total"] >= r.latency_ms["handler"]
    assert len({r.request_id for r in infers}) == 5
    (bad,) = [r for r in records if r.kind == "knobs"]
    assert not bad.ok and bad.error_code == Code.BAD_PAYLOAD
