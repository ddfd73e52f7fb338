"""Per-request steering: an infer request carrying its own `steer` setting, through real sockets and the
installed `vla-steer serve`; the live knobs stay the default and are never touched by such a request."""

from __future__ import annotations

import numpy as np
import pytest
from support import free_address, in_threads, serve_process

from policies import load_policy
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.core.steering import MAX_ACTIVATION
from vla_steer.wire import Client, RemoteError, Server

RNG = np.random.default_rng(7)
OBSERVATIONS = [
    {"instruction": text, "images": {"agentview": RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)}}
    for text in ("pick up the red block", "push the bowl left", "open the drawer")
]
SETTINGS = [{"fast": 60.0, "up": 60.0}, {"slow": 40.0, "down": -30.0}, {}]


@pytest.fixture
def node(checkpoint):
    return PolicyNode(
        load_policy(checkpoint / "policy.yaml"), load_directions(checkpoint / "directions").values()
    )


@pytest.fixture
def served(node):
    with Server(node, "tcp://127.0.0.1:0").start() as server:
        yield server


def _live(c: Client, setting: dict, obs) -> np.ndarray:
    """The actions a lone client gets with `setting` as the live knobs (then every knob off again)."""
    c.knobs_off()
    if setting:
        c.set_knobs(setting)
    try:
        return c.infer(obs).actions.copy()
    finally:
        c.knobs_off()


def test_a_request_setting_equals_the_same_live_knobs_and_leaves_them_alone(served):
    with Client(served.address) as c:
        expected = [[_live(c, s, o) for o in OBSERVATIONS] for s in SETTINGS]
        assert not np.array_equal(expected[0][0], expected[2][0])  # the settings do steer
        c.set_knobs({"slow": 20.0})  # live knobs on, different from every request's setting
        live = c.get_knobs()
        for setting, want in zip(SETTINGS, expected, strict=True):
            for obs, actions in zip(OBSERVATIONS, want, strict=True):
                res = c.infer(obs, steer=setting)
                assert np.array_equal(res.actions, actions)
                applied = res.info["steering"]
                assert {n for n, s in applied.items() if s["enabled"]} == set(setting)
                assert all(applied[n]["strength"] == v for n, v in setting.items())
        assert c.get_knobs() == live  # untouched
        # Without `steer` the live knobs apply, as before, and are what the reply reports.
        res = c.infer(OBSERVATIONS[0])
        assert res.info["steering"]["slow"]["enabled"] and res.info["steering"]["slow"]["strength"] == 20.0
        assert np.array_equal(res.actions, _live(c, {"slow": 20.0}, OBSERVATIONS[0]))


@pytest.mark.parametrize(
    ("steer", "message"),
    [
        ({"turbo": 1.0}, "steer: unknown knob 'turbo'"),
        ({"fast": float("nan")}, "'fast' must be a finite number"),
        ({"fast": float("inf")}, "'fast' must be a finite number"),
        ({"fast": "4"}, "'fast' must be a finite number"),
        ({"up": 10 * MAX_ACTIVATION}, "strength 100000 for 'up' is out of range for mode 'clamp'"),
    ],
)
def test_a_refused_setting_names_the_knob_and_changes_nothing(served, steer, message):
    with Client(served.address, retries=0) as c, Client(served.address) as other:
        c.set_knobs({"fast": 8.0})
        live = c.get_knobs()
        before = other.infer(OBSERVATIONS[1]).actions.copy()
        with pytest.raises(RemoteError, match=message) as e:
            c.infer(OBSERVATIONS[0], steer=steer)
        assert e.value.field == "steer" and e.value.code == "bad_payload"
        assert c.get_knobs() == live
        assert np.array_equal(other.infer(OBSERVATIONS[1]).actions, before)


def test_two_concepts_that_overlap_beyond_the_bound_are_refused_together(node, served):
    # Two "add" concepts on one neuron: each within the bound, their sum not.
    neuron = node.steerer.neurons("fast")[0]
    node.steerer.add("a", [(neuron.layer, neuron.index)], mode="add", enabled=False)
    node.steerer.add("b", [(neuron.layer, neuron.index)], mode="add", enabled=False)
    with Client(served.address, retries=0) as c:
        c.infer(OBSERVATIONS[0], steer={"a": 0.6 * MAX_ACTIVATION})
        with pytest.raises(RemoteError, match=r"steer: concepts \['a', 'b'\] together steer neuron"):
            c.infer(OBSERVATIONS[0], steer={"a": 0.6 * MAX_ACTIVATION, "b": 0.6 * MAX_ACTIVATION})


@pytest.mark.timeout(240)
def test_clients_sharing_the_installed_serve_with_different_settings_get_their_own_actions(checkpoint):
    address = free_address()
    proc = serve_process(checkpoint, address)
    try:
        with Client(address, timeout=30) as c:
            expected = {i: [_live(c, s, o) for o in OBSERVATIONS] for i, s in enumerate(SETTINGS)}
            c.set_knobs({"down": 50.0})  # a third client's live knobs: neither request setting
            live = c.get_knobs()

        def run(i: int) -> list[np.ndarray]:
            with Client(address, timeout=30) as client:
                return [
                    client.infer(o, steer=SETTINGS[i]).actions.copy() for _ in range(3) for o in OBSERVATIONS
                ]

        got = in_threads(run, len(SETTINGS))  # every client's actions, or the test fails
        for i, actions in enumerate(got):
            for k, a in enumerate(actions):
                assert np.array_equal(a, expected[i][k % len(OBSERVATIONS)]), (i, k)
        with Client(address, timeout=30) as c:
            assert c.get_knobs() == live
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
