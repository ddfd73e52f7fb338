"""The policy node over real ZeroMQ sockets with a real (tiny, random) VLA: knobs, activations, errors."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from support import VLA_STEER, free_address, serve_process, wait_for

from policies import load_policy
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.core.steering import MAX_ACTIVATION, Steerer
from vla_steer.wire import Client, RemoteError, Server, TelemetrySubscriber

IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
OBS = {"instruction": "pick up the red block", "images": {"agentview": IMAGE}}


@pytest.fixture
def node(checkpoint):
    policy = load_policy(checkpoint / "policy.yaml")
    return PolicyNode(policy, load_directions(checkpoint / "directions").values())


@pytest.fixture
def served(node):
    with Server(node, "tcp://127.0.0.1:0", telemetry_address="tcp://127.0.0.1:0").start() as server:
        yield server


def test_hello_describes_policy_and_knobs(served, node):
    with Client(served.address) as c:
        info = c.hello()
    assert info.policy == "tiny-vla" and info.action_dim == 7 and info.chunk_length == 1
    assert dict(info.image_keys) == {"agentview": (32, 32, 3)}
    assert {"fast", "slow", "up", "down"} <= set(info.concepts)


def test_knobs_over_the_socket_show_in_the_next_inference(served):
    with Client(served.address) as c:
        base = c.infer(OBS).actions.copy()
        assert base.shape == (1, 7) and np.all(np.abs(base) <= 1)
        state = c.set_knobs({"fast": 60.0, "up": 60.0})
        assert state["fast"]["enabled"] and state["fast"]["strength"] == 60.0
        steered = c.infer(OBS)
        assert not np.array_equal(steered.actions, base)
        assert steered.info["steering"]["fast"]["strength"] == 60.0
        c.disable(["fast", "up"])
        assert np.array_equal(c.infer(OBS).actions, base)  # off is exactly the unsteered policy
        c.knobs_off()
        assert not any(s["enabled"] for s in c.list_knobs().values())
        assert np.array_equal(c.infer(OBS).actions, base)


def test_requested_activations_come_back_bounded_and_named(served, node):
    with Client(served.address) as c:
        plain = c.infer(OBS).actions.copy()
        res = c.infer(OBS, activations=["fast", "layer:1"])
    n_fast = len(node.steerer.neurons("fast"))
    # One row per forward: the prefill and 6 decoded tokens.
    assert res.activations["fast"].shape == (7, n_fast)
    assert res.activations["layer:1"].shape == (7, node.policy.backbone.d_mlp)
    assert all(np.all(np.isfinite(a)) for a in res.activations.values())
    assert np.array_equal(res.actions, plain)  # recording does not change the policy
    with Client(served.address) as c, pytest.raises(RemoteError, match="unknown activation 'speedy'"):
        c.infer(OBS, activations=["speedy"])
    # Repeated names are recorded once; a selection over the node's bound is refused as too large.
    node.max_recorded_neurons = node.policy.backbone.d_mlp
    with Client(served.address, retries=0) as c:
        assert set(c.infer(OBS, activations=["layer:0", "layer:0"]).activations) == {"layer:0"}
        with pytest.raises(RemoteError, match="too_large"):
            c.infer(OBS, activations=["layer:0", "layer:1"])


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        ({"instruction": "go", "images": {}}, "missing \\['agentview'\\]"),
        (
            {"instruction": "go", "images": {"agentview": IMAGE[:16]}},
            "uint8\\[32, 32, 3\\], got uint8\\[16, 32, 3\\]",
        ),
        ({"instruction": "go", "images": {"agentview": IMAGE.astype(np.float32)}}, "got float32"),
        ({"instruction": "", "images": {"agentview": IMAGE}}, "instruction must be a non-empty string"),
    ],
)
def test_bad_observations_get_a_clear_error_and_the_node_keeps_serving(served, obs, message):
    with Client(served.address, retries=0) as c:
        with pytest.raises(RemoteError, match=message):
            c.infer(obs)
        assert c.infer(OBS).actions.shape == (1, 7)


def test_unknown_knob_is_an_error_naming_it(served):
    with Client(served.address, retries=0) as c, pytest.raises(RemoteError, match="unknown concept 'turbo'"):
        c.set_knobs({"turbo": 1.0})


def test_telemetry_carries_actions_and_steering_state(served):
    with TelemetrySubscriber(served.telemetry_address) as sub, Client(served.address) as c:
        # PUB/SUB: records published before the subscription reaches the publisher are lost; probe until
        # one arrives, then the records of this test's requests follow in order.
        wait_for(lambda: (c.hello(), sub.recv(timeout=0.05))[1] is not None, what="the subscription")
        sub.drain()
        c.set_knobs({"slow": 5.0})
        c.infer(OBS)

        def infer_record():
            rec = sub.recv(timeout=0.5)
            return rec if rec is not None and rec.kind == "infer" else None

        infer = wait_for(infer_record, what="the infer request's record")
    assert infer.ok and len(infer.telemetry["actions"][0]) == 7
    assert infer.telemetry["steering"]["slow"] == {
        **infer.telemetry["steering"]["slow"],
        "strength": 5.0,
        "enabled": True,
    }
    assert {"handler", "total"} <= set(infer.latency_ms)


def _knobs(address, *args):
    return subprocess.run(
        [VLA_STEER, "knobs", *args, "--server", address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_serve_and_knobs_then_sigkill_and_restart(checkpoint):
    """`vla-steer serve` as a process: knobs from the CLI, then SIGKILL, detection, restart, recovery."""
    address = free_address()
    proc = serve_process(checkpoint, address)
    try:
        with Client(address, timeout=3.0, liveness=1.0) as c:
            assert c.wait_alive(10.0)
            base = c.infer(OBS).actions.copy()
            r = _knobs(address, "set", "fast=60", "up=60")
            assert r.returncode == 0, r.stderr
            assert "fast" in r.stdout and "60" in r.stdout
            assert not np.array_equal(c.infer(OBS).actions, base)
            listed = _knobs(address, "list")
            assert listed.returncode == 0 and "slow" in listed.stdout
            assert _knobs(address, "off").returncode == 0
            assert np.array_equal(c.infer(OBS).actions, base)

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # How soon (about the 1 s liveness window) is measured in benchmarks/transport_rtt.py.
            wait_for(lambda: not c.alive, what="the client to notice the dead node")
            with pytest.raises(TimeoutError):
                c.infer(OBS, timeout=0.3, retries=0)

            proc = serve_process(checkpoint, address)  # same address, fresh process, knobs all off again
            assert c.wait_alive(10.0)
            assert np.array_equal(c.infer(OBS).actions, base)
        bad = _knobs(address, "set", "fast")
        assert bad.returncode == 2 and "fast=4" in bad.stderr
    finally:
        proc.kill()
        proc.wait(10)


def test_knobs_cli_reports_a_bad_address():
    r = subprocess.run(
        [VLA_STEER, "knobs", "list", "--server", "foo"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "tcp://127.0.0.1:5555" in r.stderr and "Traceback" not in r.stderr


def test_knobs_cli_reports_a_missing_node():
    r = subprocess.run(
        [VLA_STEER, "knobs", "list", "--server", free_address(), "--timeout", "0.5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 3 and "no policy node answered" in r.stderr


class GatedPolicy:
    """The real policy, held at the start of each inference until the test opens the gate."""

    def __init__(self, policy):
        self.inner, self.spec, self.backbone = policy, policy.spec, policy.backbone
        self.backbones = policy.backbones
        self.entered, self.gate = threading.Event(), threading.Event()

    def reset(self):
        self.inner.reset()

    def infer(self, obs):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.infer(obs)


def test_knobs_and_liveness_are_answered_while_an_inference_runs(checkpoint):
    policy = GatedPolicy(load_policy(checkpoint / "policy.yaml"))
    node = PolicyNode(policy, load_directions(checkpoint / "directions").values())
    with (
        Server(node, "tcp://127.0.0.1:0").start() as server,
        Client(server.address) as sim,
        Client(server.address) as ui,
    ):
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("reply", sim.infer(OBS, timeout=30)))
        t.start()
        try:
            assert policy.entered.wait(30)
            state = ui.set_knobs({"fast": 60.0})  # answered while the inference is held
            assert state["fast"]["enabled"] and ui.ping() is not None
            wait_for(lambda: sim.alive, what="heartbeats answered during the inference")
        finally:
            policy.gate.set()
            t.join(30)
        # The running inference kept the setting it started with; the next one is steered.
        assert result["reply"].info["steering"]["fast"]["enabled"] is False
        assert sim.infer(OBS).info["steering"]["fast"]["strength"] == 60.0


def _knob_state(c, name):
    state = c.list_knobs()[name]
    return state["strength"], state["enabled"]


@pytest.mark.parametrize("strength", [1e39, 1e30, -1e30, 2 * MAX_ACTIVATION])
def test_a_strength_beyond_the_bound_is_refused_never_stored_and_the_node_keeps_inferring(served, strength):
    with Client(served.address, retries=0) as c:
        base = c.infer(OBS).actions.copy()
        with pytest.raises(RemoteError, match="out of range for mode 'clamp'") as e:
            c.set_knobs({"fast": strength})
        assert e.value.code == "bad_payload" and f"{MAX_ACTIVATION:g}" in e.value.message
        assert _knob_state(c, "fast") == (0.0, False)
        assert np.array_equal(c.infer(OBS).actions, base)


def test_knobs_cli_refuses_an_overflowing_strength(served):
    r = _knobs(served.address, "set", "fast=1e39")
    assert r.returncode == 2 and "out of range" in r.stderr and "Traceback" not in r.stderr
    with Client(served.address) as c:
        assert _knob_state(c, "fast") == (0.0, False)


def test_a_multi_knob_request_is_all_or_nothing_across_every_steered_stack(node, served):
    """A second Steerer (pi0's action expert has one; here a second stack on the tiny model) must roll back
    with the first when any part of the request fails."""
    expert = Steerer(node.policy.backbone)
    expert.add("grip", [(1, 3)], strength=0.0, enabled=False)
    node.steerers["expert"] = expert
    with Client(served.address, retries=0) as c:
        before = c.list_knobs()
        for request in (
            {"fast": 5.0, "grip": 1e39},
            {"grip": 5.0, "fast": 1e30},
            {"fast": 2.0, "turbo": 1.0},
        ):
            with pytest.raises(RemoteError):
                c.set_knobs(request)
            assert c.list_knobs() == before, request
        c.set_knobs({"fast": 5.0, "grip": 3.0})
        after = c.list_knobs()
        assert after["fast"]["strength"] == 5.0 and after["grip"] == {**after["grip"], "enabled": True}
        with pytest.raises(RemoteError, match="unknown concept 'turbo'"):
            c.disable(["fast", "grip", "turbo"])
        assert c.list_knobs() == after


def test_a_state_beyond_float32_is_refused_even_by_a_policy_that_takes_none(served):
    with Client(served.address, retries=0) as c:
        with pytest.raises(RemoteError, match=r"observation.state\[1\] is 1e\+39") as e:
            c.infer({**OBS, "state": np.array([0.0, 1e39])})
        assert e.value.code == "not_finite"
        assert c.infer({**OBS, "state": np.array([0.0, 1.0])}).actions.shape == (1, 7)  # dropped, as before


@pytest.fixture(scope="module")
def state_checkpoint(tmp_path_factory):
    from policies.tiny_vla import TinyVLA, TinyVLAConfig

    root = tmp_path_factory.mktemp("tiny_vla_state")
    TinyVLA.build(TinyVLAConfig(state_dim=3), seed=4).save(root / "policy")
    (root / "policy.yaml").write_text("kind: tiny_vla\npath: policy\ndevice: cpu\n")
    return root


@pytest.mark.parametrize(
    ("state", "where"),
    [
        (
            np.array([0.1, 1e39, 0.2]),
            "observation.state\\[1\\] is 1e\\+39",
        ),  # finite in float64, inf in float32
        (np.array([0.1, 0.2, np.nan], np.float32), "observation.state"),
        (np.array([-np.inf, 0.0, 0.0]), "observation.state"),
    ],
)
def test_a_state_that_is_not_finite_in_the_models_dtype_is_refused_over_the_socket(
    state_checkpoint, state, where
):
    node = PolicyNode(load_policy(state_checkpoint / "policy.yaml"))
    with Server(node, "tcp://127.0.0.1:0").start() as server, Client(server.address, retries=0) as c:
        ok = {**OBS, "state": np.array([0.1, 0.2, 0.3])}
        assert c.infer(ok).actions.shape == (1, 7)
        with pytest.raises(RemoteError, match=where) as e:
            c.infer({**OBS, "state": state})
        assert e.value.code == "not_finite" and e.value.field == "observation.state"
        assert c.infer(ok).actions.shape == (1, 7)
    assert node.inferences == 2  # the refused request never reached the policy


def test_a_state_beyond_a_float16_model_is_refused_before_inference(state_checkpoint):
    """Validated after the cast to the model's dtype: 1e5 is a finite float32 but inf in float16."""
    policy = load_policy(state_checkpoint / "policy.yaml")
    policy.language_model.to(torch.float16)
    node = PolicyNode(policy)
    beyond = r"state\[2\] is 100000.0, beyond what the model's torch.float16"
    with (
        Server(node, "tcp://127.0.0.1:0").start() as server,
        Client(server.address, retries=0) as c,
        pytest.raises(RemoteError, match=beyond),
    ):
        c.infer({**OBS, "state": np.array([0.0, 1.0, 1e5], np.float32)})
    assert node.inferences == 0


@pytest.mark.parametrize(
    "name", ["layer:\u0663", "layer:1\n", "layer: 1", "layer:+1", "layer:1 ", "layer:\uff11"]
)
def test_activation_layer_names_are_strict_ascii(served, name):
    with Client(served.address, retries=0) as c:
        with pytest.raises(RemoteError, match="ASCII digits") as e:
            c.infer(OBS, activations=[name])
        assert e.value.field == "activations"
        assert set(c.infer(OBS, activations=["layer:1"]).activations) == {"layer:1"}


def _status_bytes(pid: int, key: str) -> int:
    """A /proc/<pid>/status memory figure (VmRSS: resident now, VmHWM: peak resident) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_oversized_requests_for_a_while_leave_the_nodes_memory_bounded(checkpoint):
    """`vla-steer serve` refuses 60 requests of 72 MB (3 frames of 24 MB, each within the 64 MB cap, their
    sum beyond it): its peak RSS stays within one request in flight of its idle RSS (2x for allocator
    slack), it does not grow over the last 50 of them, and it answers every valid request in between.

    glibc may keep one freed request's pages for reuse (its mmap threshold rises to 32 MB after the first
    free), so "freed" is measured as no growth after the first ten, not as a return to the idle RSS: a leak
    of even one frame per request would add 1.2 GB over the last 50."""
    request = 3 * (24 << 20)
    address = free_address()
    proc = serve_process(checkpoint, address)
    try:
        with Client(address, max_message_bytes=2**31, timeout=60, retries=0) as c:
            for _ in range(3):
                c.infer(OBS)  # warm: the first inferences allocate the model's working memory
            idle = _status_bytes(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
            pad = np.zeros(24 << 20, np.uint8)
            for i in range(60):
                with pytest.raises(RemoteError, match="too_large"):
                    c.infer({**OBS, "pad": [pad, pad, pad]})
                if i % 10 == 0:
                    assert c.infer(OBS).actions.shape == (1, 7)
                if i == 9:
                    settled = _status_bytes(proc.pid, "VmRSS")
            peak, end = _status_bytes(proc.pid, "VmHWM"), _status_bytes(proc.pid, "VmRSS")
        growth = {
            "idle_mb": idle >> 20,
            "settled_mb": settled >> 20,
            "peak_mb": peak >> 20,
            "end_mb": end >> 20,
        }
        assert peak - idle <= 2 * request, growth
        assert end - settled <= request, growth
        assert end - idle <= 2 * request, growth
    finally:
        proc.kill()
        proc.wait(10)
