"""Batched inference: concurrent infer requests share one forward, each under its own steering setting and
episode, and every client gets exactly (greedy tokens) or within float tolerance (pi0's flow matching with
fixed noise) what it gets alone. Through real sockets, per policy kind, and the installed `vla-steer serve`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from support import free_address, in_threads, serve_process
from tiny_pi0 import make_obs, tiny_config, tiny_stats

from policies import load_policy
from policies.openvla import tiny as tiny_openvla
from policies.openvla.policy import OpenVLAPolicy
from policies.pi0.policy import PI0Policy
from vla_steer.core import tiny
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.core.steering import Steerer
from vla_steer.wire import Client, Request, Server

RNG = np.random.default_rng(11)
TINY_OBS = [
    {"instruction": text, "images": {"agentview": RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)}}
    for text in ("pick up the red block", "push the bowl left", "open the top drawer of the cabinet")
]
# One setting per client: request settings, the live knobs (None) and unsteered ({}).
TINY_SETTINGS = [{"fast": 60.0, "up": 60.0}, {"slow": 40.0}, None, {}, {"down": -30.0, "fast": 10.0}]
LIVE = {"up": 25.0}


def run_clients(address: str, scripts: list[list[tuple]], *, reset: bool = False) -> list[list]:
    """Each script in its own client and thread, step by step in lockstep (a barrier before each step), so
    the requests of one step reach the node together. Returns each client's InferResults."""
    barrier = threading.Barrier(len(scripts))

    def run(i: int) -> list:
        try:
            with Client(address, timeout=60) as c:
                if reset:
                    c.reset(episode=f"client-{i}")
                out = []
                for obs, steer, *asks in scripts[i]:  # (observation, steer[, activations])
                    barrier.wait(timeout=60)
                    out.append(c.infer(obs, steer=steer, activations=asks[0] if asks else None))
                return out
        except BaseException:
            barrier.abort()  # the other clients stop waiting for this one
            raise

    return in_threads(run, len(scripts))


def held(node: PolicyNode, seconds: float = 0.5) -> threading.Event:
    """Wraps `node.infer` (what the server calls for a batch of one): once the returned event is set, the next
    single inference takes `seconds` longer, so the clients asking with it queue up behind it and the next
    forward is a batch however loaded the machine (without it, whether requests meet is up to the scheduler)."""
    armed = threading.Event()
    infer = node.infer

    def infer_held(req):
        if armed.is_set():
            armed.clear()
            time.sleep(seconds)
        return infer(req)

    node.infer = infer_held
    return armed


def alone(address: str, script: list[tuple], *, reset: bool = False) -> list[np.ndarray]:
    return [r.actions.copy() for r in run_clients(address, [script], reset=reset)[0]]


def tiny_scripts(rounds: int = 3) -> list[list[tuple]]:
    return [
        [(TINY_OBS[(i + k) % len(TINY_OBS)], s) for k in range(rounds)] for i, s in enumerate(TINY_SETTINGS)
    ]


@pytest.fixture
def tiny_node(checkpoint):
    return PolicyNode(
        load_policy(checkpoint / "policy.yaml"),
        load_directions(checkpoint / "directions").values(),
        batch_max=8,
    )


def test_the_steerer_keeps_its_shared_buffers_for_one_setting_and_adds_rows_for_several(llama):
    st = Steerer(llama)
    st.add("a", [(1, 3), (2, 5)], strength=4.0, enabled=False)
    st.add("b", [(1, 7)], mode="scale", strength=2.0, enabled=False)
    one, other = st.resolve({"a": 4.0}), st.resolve({"b": 2.0})
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with st.consistent([one, one]):
        assert all(buf.rows is None for buf in st._buffers.values())  # the fast path: today's buffers
        shared = llama.root(ids).logits
    with st.consistent([one, other]):
        assert all(buf.rows is not None for buf in st._buffers.values())
        mixed = llama.root(ids).logits
    assert all(buf.rows is None for buf in st._buffers.values())  # rows only for the block
    with st.consistent(other):
        row1 = llama.root(ids[1:]).logits
    torch.testing.assert_close(mixed[0], shared[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], row1[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1])


@pytest.mark.timeout(300)
def test_tiny_vla_batched_through_sockets_equals_each_client_alone(tiny_node):
    tiny_node.steerer.update(LIVE, enable=True)
    scripts = tiny_scripts()
    hold = held(tiny_node)
    with Server(tiny_node, "tcp://127.0.0.1:0", batch_wait=0.05).start() as server:
        expected = [alone(server.address, s) for s in scripts]
        assert all(r.info["batch"] == 1 for r in run_clients(server.address, [scripts[0]])[0])  # lone: never
        hold.set()
        got = run_clients(server.address, scripts)
    assert max(r.info["batch"] for rs in got for r in rs) > 1  # batching did happen
    for i, (results, want) in enumerate(zip(got, expected, strict=True)):
        for k, (r, a) in enumerate(zip(results, want, strict=True)):
            assert np.array_equal(r.actions, a), (i, k)
            steer = TINY_SETTINGS[i]
            on = {n for n, s in r.info["steering"].items() if s["enabled"]}
            assert on == set(LIVE if steer is None else steer)
    assert tiny_node.steerer.state()["up"]["strength"] == 25.0  # the live knobs untouched


@pytest.mark.timeout(300)
def test_requests_asking_for_the_same_activations_share_a_forward_and_get_their_own_rows(tiny_node):
    """Each client's recorded activations (concept neurons and a whole layer, every forward's last position)
    are its own sample's, as alone; clients asking for other activations run in other forwards."""
    asks = [["fast", "layer:1"], ["fast", "layer:1"], ["fast", "layer:1"], ["up"], None]
    # One observation per step for everyone (one prompt length), each client under its own setting.
    scripts = [[(TINY_OBS[k], steer, asks[i]) for k in range(2)] for i, steer in enumerate(TINY_SETTINGS)]
    hold = held(tiny_node)
    with Server(tiny_node, "tcp://127.0.0.1:0", batch_wait=0.05).start() as server:
        expected = [run_clients(server.address, [s])[0] for s in scripts]
        hold.set()
        got = run_clients(server.address, scripts)
    assert max(r.info["batch"] for rs in got[:3] for r in rs) > 1  # the three that ask alike did share
    for i, (results, want) in enumerate(zip(got, expected, strict=True)):
        for r, w in zip(results, want, strict=True):
            assert np.array_equal(r.actions, w.actions)
            assert sorted(r.activations) == sorted(asks[i] or [])
            for name, values in w.activations.items():
                assert values.shape[0] > 1  # one row per forward (prefill and each decoded token)
                np.testing.assert_allclose(r.activations[name], values, rtol=1e-4, atol=1e-5)
    fast = [r.activations["fast"] for rs in got[:3] for r in rs]
    assert not all(np.array_equal(fast[0], f) for f in fast[1:])  # the rows differ between clients


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_serve_batches_clients_with_their_own_settings(checkpoint):
    address = free_address()
    proc = serve_process(checkpoint, address, extra=("--batch-max", "8", "--batch-wait-ms", "20"))
    try:
        with Client(address, timeout=30) as c:
            hello = c.hello().info
            assert hello["inference"] == "batched"
            assert hello["positions"] == "all"  # the default for a policy that says no plan
            c.set_knobs(LIVE)
        scripts = tiny_scripts()
        expected = [alone(address, s) for s in scripts]
        for _ in range(5):  # a subprocess cannot be held (see `held`): rerun until the requests have met
            got = run_clients(address, scripts)
            for i, (results, want) in enumerate(zip(got, expected, strict=True)):
                assert all(np.array_equal(r.actions, a) for r, a in zip(results, want, strict=True)), i
            if max(r.info["batch"] for rs in got for r in rs) > 1:
                break
        else:
            pytest.fail("five lockstep rounds of 5 clients never formed a batch")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_serve_refuses_bad_batch_flags_before_loading(checkpoint):
    import subprocess

    from support import VLA_STEER

    for flags, message in ((("--batch-max", "0"), "--batch-max must be 1..32"),
                           (("--batch-wait-ms", "nan"), "--batch-wait-ms must be 0..1000")):  # fmt: skip
        run = subprocess.run(
            [VLA_STEER, "serve", "--policy", str(checkpoint / "policy.yaml"), "--bind", free_address(), *flags],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode != 0 and message in run.stderr, run.stderr


@pytest.mark.timeout(300)
def test_openvla_batched_equals_alone(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tiny_openvla.save_checkpoint(tmp_path, tiny_openvla.build_model())
        node = PolicyNode(OpenVLAPolicy.load(path, unnorm_key="tiny_suite"), batch_max=8)
        node.steerer.add("k", [(1, i) for i in range(8)], strength=0.0, enabled=False)
        rng = np.random.default_rng(1)
        obs = [
            {
                "instruction": text,
                "images": {"agentview": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)},
            }
            for text in ("pick up the cube", "open the drawer", "pick up the bowl")
        ]
        # Prompt lengths 15, 14, 14, 15 tokens (one forward per length): whichever client `held` holds, two of
        # the others share a forward.
        scripts = [[(obs[i % 3], s)] * 2 for i, s in enumerate([{"k": 8.0}, {}, {"k": -8.0}, None])]
        hold = held(node)
        with Server(node, "tcp://127.0.0.1:0", batch_wait=0.05).start() as server:
            expected = [alone(server.address, s) for s in scripts]
            hold.set()
            got = run_clients(server.address, scripts)
        assert max(r.info["batch"] for rs in got for r in rs) > 1
        for results, want in zip(got, expected, strict=True):
            assert all(np.array_equal(r.actions, a) for r, a in zip(results, want, strict=True))
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(300)
def test_pi0_batched_keeps_each_clients_episode_and_matches_alone_within_tolerance():
    tok = tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"])
    policy = PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_stats())
    policy.seed = 0  # every client's episode draws the same seeded noise sequence
    node = PolicyNode(policy, batch_max=8)
    node.steerer.add("k", [(0, i) for i in range(16)], mode="add", strength=0.0, enabled=False)
    obs = [make_obs(seed=s, instruction=text) for s, text in ((1, "pick up the red block"), (2, "stack it"))]
    payloads = [o.to_payload() for o in obs]
    # Two prompt lengths (each its own forward) x two clients each: whichever client `held` holds, two of
    # the others share a forward.
    scripts = [[(payloads[i % 2], s)] * 3 for i, s in enumerate([{"k": 3.0}, {}, {"k": -2.0}, {"k": 1.0}])]
    hold = held(node)
    with Server(node, "tcp://127.0.0.1:0", batch_wait=0.05).start() as server:
        expected = [alone(server.address, s, reset=True) for s in scripts]
        hold.set()
        got = run_clients(server.address, scripts, reset=True)
    assert hello_inference(node) == "batched"
    assert max(r.info["batch"] for rs in got for r in rs) > 1
    assert not np.allclose(expected[0][0], expected[0][1])  # the noise moves on within an episode
    for results, want in zip(got, expected, strict=True):
        for r, a in zip(results, want, strict=True):
            np.testing.assert_allclose(r.actions, a, rtol=1e-4, atol=1e-5)


def hello_inference(node: PolicyNode) -> str:
    return node.hello(None).info["inference"]


def test_hello_says_batched_only_when_the_node_batches(checkpoint):
    policy = load_policy(checkpoint / "policy.yaml")
    assert hello_inference(PolicyNode(policy)) == "sequential"  # the default: one at a time
    node = PolicyNode(policy, batch_max=8)
    assert (hello_inference(node), node.hello(None).info["batch_max"]) == ("batched", 8)
    with pytest.raises(ValueError, match="the handler's batch_max is 8"):
        Server(node, "tcp://127.0.0.1:0", batch_max=4)
    address = free_address()
    proc = serve_process(checkpoint, address, extra=("--batch-max", "1"))
    try:
        with Client(address, timeout=30) as c:
            info = c.hello().info
        assert (info["inference"], info["batch_max"]) == ("sequential", 1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_client_without_its_own_episode_is_told_it_shares_the_policys(caplog):
    tok = tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"])
    policy = PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_stats())
    node = PolicyNode(policy, batch_max=8)
    obs = make_obs(seed=1, instruction="pick up the red block").to_payload()

    def request(kind: str, client: bytes) -> Request:
        return Request(kind, {"observation": obs} if kind == "infer" else {"episode": "e1"}, 1, 0.0, client)

    with caplog.at_level("WARNING", logger="vla_steer.core.node"):
        # Never reset, or reconnected (a new routing id): the shared noise generator, said in every reply.
        assert node.infer(request("infer", b"a")).payload.info["shared_episode"] is True
        assert node.infer(request("infer", b"b")).payload.info["shared_episode"] is True
        node.reset(request("reset", b"a"))
        info = node.infer(request("infer", b"a")).payload.info
        assert "shared_episode" not in info and info["episode"] == "e1"
    assert sum("shared state" in r.getMessage() for r in caplog.records) == 1  # logged once
