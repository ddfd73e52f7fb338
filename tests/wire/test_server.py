"""The Server over real ZeroMQ sockets (127.0.0.1 with ephemeral ports, ipc in a tmp dir): dispatch, control,
concurrency, malformed input, the client table, close. Every blocking call has a timeout.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import wait_for
from wire_support import LOCAL, FakePolicy, raw_exchange, raw_socket, serving

from vla_steer.wire import (
    Client,
    Code,
    ProtocolError,
    RemoteError,
    Reply,
    Request,
    RequestTimeout,
    Server,
    TelemetrySubscriber,
    decode,
    encode,
)
from vla_steer.wire.codec import ALLOWED_DTYPES, MAX_ARRAYS

# ----------------------------------------------------------------------------------------------- dispatch


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


# ------------------------------------------------------------------------------------------------ control


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


# ---------------------------------------------------------------------------------------------- addresses


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
        wait_for(lambda: c.infer({"tag": 6}).info["tag"] == 6 and sub.recv(timeout=0.2) is not None)


def test_ipc_addresses_work(tmp_path: Path) -> None:
    with serving(address=f"ipc://{tmp_path}/policy.sock") as srv, Client(srv.address) as c:
        assert srv.address.startswith("ipc://")
        assert c.infer({"tag": 8}).info["tag"] == 8


def test_req_sockets_work_too() -> None:
    with serving() as srv, zmq.Context() as ctx, ctx.socket(zmq.REQ) as req:
        req.linger = 0
        req.connect(srv.address)
        req.send_multipart(encode("heartbeat", {}, request_id=5))
        assert req.poll(2000)
        msg = decode(req.recv_multipart())
        assert (msg.kind, msg.request_id) == ("heartbeat", 5)


# ------------------------------------------------------------------------------------------- concurrency


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


def test_slow_infer_does_not_delay_control_messages() -> None:
    policy = FakePolicy()
    with serving(policy) as srv, Client(srv.address) as sim, Client(srv.address) as ui:
        done = threading.Event()

        def slow() -> None:
            sim.infer({"tag": 1, "hold": True}, timeout=30.0)
            done.set()

        t = threading.Thread(target=slow)
        t.start()
        try:
            assert policy.started.wait(10.0)
            # All answered while the inference is held: control kinds never queue behind the worker.
            ui.set_knobs({"up": 2.0})
            assert ui.ping() is not None
            ui.hello()
            assert not done.is_set()
            wait_for(lambda: sim.alive, what="heartbeats answered during the inference")
        finally:
            policy.release.set()
            t.join(10)
        assert done.is_set()


class BatchingPolicy(FakePolicy):
    """A FakePolicy that batches (`batch_max`), logging what it runs: ("batch", tags), ("infer", tag), "reset"."""

    batch_max = 8

    def __init__(self) -> None:
        super().__init__()
        self.ran: list = []

    def infer(self, req: Request) -> Reply:
        if not req.payload["observation"].get("hold"):
            self.ran.append(("infer", req.payload["observation"]["tag"]))
        return super().infer(req)

    def infer_batch(self, reqs: list[Request]) -> list[Reply]:
        self.ran.append(("batch", [r.payload["observation"]["tag"] for r in reqs]))
        return [super(BatchingPolicy, self).infer(r) for r in reqs]

    def reset(self, req: Request) -> dict[str, Any]:
        self.ran.append("reset")
        return super().reset(req)


def test_a_reset_ends_a_batch_so_each_clients_requests_run_in_order() -> None:
    policy = BatchingPolicy()
    with (
        serving(policy) as srv,
        Client(srv.address) as holder,
        zmq.Context() as ctx,
        raw_socket(ctx, srv.address) as a,
        raw_socket(ctx, srv.address) as b,
    ):
        t = threading.Thread(target=holder.infer, args=({"hold": True},), kwargs={"timeout": 30.0})
        t.start()
        try:
            assert policy.started.wait(10.0)
            # Queued behind the held inference: a's infer 1, b's infer 2, then a's reset and infer 3, sent
            # without waiting for replies (a pipelining client): infer 3 must not join the batch before the reset.
            a.send_multipart(encode("infer", {"observation": {"tag": 1}}, request_id=1))
            wait_for(
                lambda: srv._pending == 2, what="a's infer queued"
            )  # (the server's queue, read directly)
            b.send_multipart(encode("infer", {"observation": {"tag": 2}}, request_id=1))
            wait_for(lambda: srv._pending == 3, what="b's infer queued")
            a.send_multipart(encode("reset", {}, request_id=2))
            a.send_multipart(encode("infer", {"observation": {"tag": 3}}, request_id=3))
            wait_for(lambda: srv._pending == 5, what="a's reset and infer queued")
        finally:
            policy.release.set()
            t.join(10)
        replies = [_receive(a) for _ in range(3)]
        assert [(m.kind, m.request_id) for m in replies] == [("infer", 1), ("reset", 2), ("infer", 3)]
        assert _receive(b).kind == "infer"
    assert policy.ran == [("batch", [1, 2]), "reset", ("infer", 3)]


def _receive(sock: zmq.Socket) -> Any:
    assert sock.poll(10_000), "no reply from server"
    return decode(sock.recv_multipart(copy=False))


def test_full_inference_queue_answers_busy() -> None:
    policy = FakePolicy()
    with serving(policy, max_pending=1) as srv, Client(srv.address) as a, Client(srv.address) as b:
        t = threading.Thread(target=a.infer, args=({"hold": True},), kwargs={"timeout": 30.0})
        t.start()
        try:
            assert policy.started.wait(10.0)
            with pytest.raises(RemoteError) as e:
                b.infer({"tag": 1})
            assert e.value.code == Code.BUSY
        finally:
            policy.release.set()
            t.join(10)
        assert b.infer({"tag": 2}).info["tag"] == 2


# -------------------------------------------------------------------------------------- malformed input

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
    st.integers(1, MAX_BYTES // 2).map(  # every frame within the cap, their sum beyond it
        lambda n: (
            _good_with(pad=[np.zeros(MAX_BYTES // 2 + n, np.uint8), np.zeros(MAX_BYTES // 2, np.uint8)]),
            Code.TOO_LARGE,
            None,
        )
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
    with zmq.Context() as ctx, raw_socket(ctx, small_server.address) as sock:
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
    assert {Code.MALFORMED, Code.FRAME_COUNT, Code.BAD_DTYPE, Code.NOT_FINITE, Code.TOO_LARGE} <= seen
    with Client(small_server.address) as c:
        assert c.infer({"tag": 7}).info["tag"] == 7


def test_oversize_request_from_a_client_gets_a_too_large_error(small_server: Server) -> None:
    with (  # our client refuses it before sending, naming the limit
        Client(small_server.address, max_message_bytes=MAX_BYTES, retries=0) as c,
        pytest.raises(ProtocolError, match=f"over the limit of {MAX_BYTES}"),
    ):
        c.infer({"img": np.zeros(2 * MAX_BYTES, np.uint8)})
    # A peer that sends it anyway, in frames each within the cap, gets the error from the server.
    with Client(small_server.address, max_message_bytes=2**30, retries=0) as c:
        frames = [np.zeros(MAX_BYTES - 100, np.uint8) for _ in range(8)]
        with pytest.raises(RemoteError) as e:
            c.infer({"frames": frames})
        assert e.value.code == Code.TOO_LARGE and f"over the limit of {MAX_BYTES}" in e.value.message
        assert c.infer({"tag": 3}).info["tag"] == 3


def test_too_many_frames_are_refused_however_small(small_server: Server) -> None:
    with zmq.Context() as ctx, raw_socket(ctx, small_server.address) as sock:
        reply = raw_exchange(sock, [_good()[0], *[b"x"] * (MAX_ARRAYS + 5)])
        assert reply.payload["code"] == Code.TOO_LARGE and "frames" in reply.payload["message"]
        assert reply.request_id == 1
        ok = raw_exchange(sock, _good("heartbeat", rid=2))
        assert (ok.kind, ok.request_id) == ("heartbeat", 2)


def test_a_frame_beyond_the_limit_disconnects_the_peer_and_serving_goes_on(small_server: Server) -> None:
    # zmq's MAXMSGSIZE cap (= the request cap, per frame) drops the connection on the frame's length
    # prefix, before its bytes are buffered and before the server could even read it.
    with Client(small_server.address, max_message_bytes=2**30, timeout=0.3, retries=0) as c:
        with pytest.raises(RequestTimeout):
            c.infer({"img": np.zeros(MAX_BYTES + 1, np.uint8)})
        assert c.infer({"tag": 4}, timeout=2.0).info["tag"] == 4


def test_requests_that_are_not_requests_are_refused(small_server: Server) -> None:
    with zmq.Context() as ctx, raw_socket(ctx, small_server.address) as sock:
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


# ------------------------------------------------------------------------------------ clients, lifecycle


def test_server_sees_clients_come_and_go() -> None:
    with serving() as srv:
        c = Client(srv.address, name="sim-A")
        try:
            wait_for(lambda: "sim-A" in srv.live_clients())
        finally:
            c.close()
        wait_for(lambda: "sim-A" not in srv.live_clients(), timeout=10.0, what="the server to drop sim-A")
        assert srv.clients()["sim-A"] > 1.0


def test_the_heartbeat_table_forgets_old_names_and_stays_bounded() -> None:
    with (
        serving(liveness=0.1, max_clients=8) as srv,
        zmq.Context() as ctx,
        raw_socket(ctx, srv.address) as sock,
    ):
        assert srv.forget_clients_after == pytest.approx(1.0)  # 10 x liveness by default
        for i in range(20):  # names are the peer's to choose: any number of them
            assert raw_exchange(sock, encode("heartbeat", {"client": f"c{i}"}, request_id=i + 1)).kind == (
                "heartbeat"
            )
        assert sorted(srv.clients(), key=lambda n: int(n[1:])) == [f"c{i}" for i in range(12, 20)]
        raw_exchange(sock, encode("heartbeat", {"client": "c12"}, request_id=99))  # c12 is fresh again
        raw_exchange(sock, encode("heartbeat", {"client": "new"}, request_id=100))
        assert "c12" in srv.clients() and "c13" not in srv.clients()  # the longest silent went
        raw_exchange(sock, encode("heartbeat", {"client": "x" * 10_000}, request_id=101))
        assert max(map(len, srv.clients())) <= 256
        wait_for(lambda: not srv.clients(), what="all forgotten after 1 s of silence")


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


def test_the_frames_of_a_refused_request_are_freed_when_its_error_is_sent() -> None:
    """With the garbage collector off, every frame the server read of an oversize request is freed by the
    time its error reply is out: no reference cycle keeps a refused request's memory alive."""
    with serving(max_message_bytes=MAX_BYTES) as srv:
        refs: list[weakref.ref] = []
        recv = srv._router.recv

        def spy(*args: Any, **kwargs: Any) -> Any:  # the server's socket thread reads every frame here
            frame = recv(*args, **kwargs)
            if isinstance(frame, zmq.Frame) and len(frame) > 1000:
                refs.append(weakref.ref(frame))
            return frame

        srv._router.recv = spy
        gc.disable()
        try:
            with Client(srv.address, max_message_bytes=2**30, retries=0) as c:
                for _ in range(3):
                    with pytest.raises(RemoteError, match="too_large"):
                        c.infer({"frames": [np.zeros(MAX_BYTES - 100, np.uint8)] * 3})
                    wait_for(lambda: refs and all(r() is None for r in refs), what="the frames to be freed")
                assert c.infer({"tag": 5}).info["tag"] == 5
        finally:
            gc.enable()
