"""CURVE keys, the client allow-list and the bind policy, over real sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from support import wait_for
from wire_support import LOCAL, FakePolicy, serving

from vla_steer.wire import (
    Client,
    InsecureBindError,
    Keypair,
    RequestTimeout,
    Server,
    TelemetrySubscriber,
    generate_keypair,
    is_loopback,
    load_keypair,
)


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
            wait_for(lambda: (alice.hello(), sub.recv(0.05))[1] is not None)


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
