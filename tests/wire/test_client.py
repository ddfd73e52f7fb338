"""The Client over real ZeroMQ sockets: every request kind, ids and late replies, timeouts and retries,
liveness of a server that dies and comes back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from support import wait_for
from wire_support import LOCAL, FakePolicy, serving

from vla_steer.wire import (
    Client,
    InferResult,
    Observation,
    RemoteError,
    Request,
    RequestTimeout,
    Server,
)


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


def test_dead_server_is_reported_within_the_liveness_window_and_recovery_follows() -> None:
    policy = FakePolicy()
    srv = Server(policy, LOCAL).start()
    address = srv.address
    with Client(address, timeout=0.5, retries=1, liveness=1.0) as c:
        try:
            assert c.wait_alive(2.0)
            assert c.infer({"tag": 1}).info["tag"] == 1
            srv.close()
            # The figure (about the liveness window) is measured in benchmarks/transport_rtt.py.
            wait_for(lambda: not c.alive, timeout=10.0, what="the client to notice the dead server")
            with pytest.raises(RequestTimeout):
                c.infer({"tag": 2}, timeout=0.2, retries=0)
            srv = Server(policy, address).start()  # same address
            wait_for(lambda: c.alive)
            assert c.infer({"tag": 3}).info["tag"] == 3
        finally:
            srv.close()


def test_a_dropped_connection_ends_liveness_at_once() -> None:
    """A liveness window far longer than the wait: only the disconnect can turn `alive` False in time."""
    srv = Server(FakePolicy(), LOCAL).start()
    with Client(srv.address, liveness=600.0) as c:
        try:
            assert c.wait_alive(2.0) and c.last_pong > float("-inf")
            srv.close()  # closes the TCP connection, as a killed process's kernel does
            wait_for(lambda: not c.alive, timeout=10.0, what="the client to see the connection drop")
            assert c.last_pong == float("-inf")
        finally:
            srv.close()


@pytest.mark.parametrize("reconnect", [True, False])
def test_a_late_reply_is_never_returned_for_a_new_request(reconnect: bool) -> None:
    policy = FakePolicy()
    with (
        serving(policy) as srv,
        Client(
            srv.address, timeout=0.2, retries=0, reconnect_on_timeout=reconnect, heartbeat_interval=None
        ) as c,
    ):
        with pytest.raises(RequestTimeout):
            c.infer({"tag": 1, "hold": True})
        policy.release.set()
        res = c.infer({"tag": 2}, timeout=10.0)  # queued behind the held one; its reply comes first
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
    tags: list[int] = []
    policy = FakePolicy()

    def infer(req: Request) -> Any:
        tags.append(req.payload["observation"]["tag"])
        return policy.infer(req)

    with serving({"infer": infer, "hello": policy.hello}) as srv, Client(srv.address, timeout=0.2) as c:
        assert c.retries == 2  # the client's retries apply to the other kinds
        try:
            with pytest.raises(RequestTimeout, match="1 attempts"):
                c.infer({"tag": 1, "hold": True})
        finally:
            policy.release.set()
        # The worker runs inferences in arrival order: a retry of the first would have run before this.
        assert c.infer({"tag": 2}, timeout=10.0).info["tag"] == 2
        assert tags == [1, 2]
        assert c.hello().policy == "fake"


def test_nothing_listening_times_out_after_the_attempts_it_was_given() -> None:
    # How long that takes (timeout x attempts) is measured in benchmarks/transport_rtt.py.
    with Client("tcp://127.0.0.1:1", timeout=0.1, retries=2, heartbeat_interval=0.05) as c:
        with pytest.raises(RequestTimeout, match="3 attempts"):
            c.hello()
        assert not c.alive and c.ping(0.05) is None
    with pytest.raises(ValueError):
        Client(timeout=float("inf"))


def test_infer_sends_an_observation_as_its_payload() -> None:
    keys = {"agentview": (8, 8, 3)}

    def infer(req: Request) -> InferResult:  # as a policy node does: the one schema checks what arrived
        obs = Observation.from_payload(req.payload["observation"], keys, state_dim=2)
        return InferResult(np.tile(np.append(obs.state, obs.images["agentview"][0, 0, 0]), (4, 1)))

    image = np.full((8, 8, 3), 7, np.uint8)
    with serving({"infer": infer}) as srv, Client(srv.address, retries=0) as c:
        actions = c.infer(Observation("go", {"agentview": image}, np.array([1.0, 2.0]))).actions
        np.testing.assert_array_equal(actions, np.tile([1.0, 2.0, 7.0], (4, 1)))
        with pytest.raises(RemoteError, match="missing"):  # a plain map still goes through as it is
            c.infer({"instruction": "go", "images": {}, "state": np.zeros(2)})
