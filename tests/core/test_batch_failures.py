"""What a failure inside a batched inference leaves behind: nothing. A Steerer buffer write that fails midway
(an allocation failure, injected: large B x d_mlp rows can run a GPU out of memory) leaves no rows and no
request setting in the hooks, so the next live and unsteered inferences equal a fresh node's; a sample the
policy cannot run errors alone, the rest of its batch get their own actions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from policies import load_policy
from vla_steer.core.discovery import load_directions
from vla_steer.core.node import PolicyNode
from vla_steer.wire import Request

RNG = np.random.default_rng(5)
IMAGES = [{"agentview": RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)} for _ in range(3)]
OBS = [{"instruction": "pick up the red block", "images": images} for images in IMAGES]  # one prompt length
LIVE = {"up": 25.0, "wide": 40.0}
_ids = itertools.count(1)


def make_node(checkpoint) -> PolicyNode:
    """The tiny node with its live knobs on, plus "wide": 16 neurons of every layer, so every layer is hooked
    and a write can fail after some layers are done."""
    node = PolicyNode(
        load_policy(checkpoint / "policy.yaml"), load_directions(checkpoint / "directions").values()
    )
    bb = node.policy.backbone
    node.steerer.add("wide", [(layer, i) for layer in range(bb.n_layers) for i in range(16)], enabled=False)
    node.steerer.update(LIVE, enable=True)
    return node


def infer(obs: dict, steer: dict | None = None, client: bytes = b"c") -> Request:
    payload = {"observation": obs} if steer is None else {"observation": obs, "steer": steer}
    return Request("infer", payload, next(_ids), 0.0, client)


def actions(node: PolicyNode, req: Request) -> np.ndarray:
    return node.infer(req).payload.actions


def fail_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """`owner.name` raises an out-of-memory error on its `call`-th call from now, and works otherwise."""
    real, calls = getattr(owner, name), itertools.count(1)

    def failing(*args, **kwargs):
        if next(calls) == call:
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def assert_clean_like_fresh(node: PolicyNode, fresh: PolicyNode) -> None:
    """The next live inference runs under the live knobs in every hooked layer, with no per-sample rows left,
    and it and an unsteered one equal a fresh node's."""
    assert np.array_equal(actions(node, infer(OBS[0])), actions(fresh, infer(OBS[0])))
    assert all(buf.rows is None for buf in node.steerer._buffers.values())
    for layer, buf in node.steerer._buffers.items():  # what that live inference ran under
        assert torch.equal(buf.keep, fresh.steerer._buffers[layer].keep), layer
        assert torch.equal(buf.fill, fresh.steerer._buffers[layer].fill), layer
    for obs in OBS[1:]:
        assert np.array_equal(actions(node, infer(obs, {})), actions(fresh, infer(obs, {})))
        assert np.array_equal(actions(node, infer(obs)), actions(fresh, infer(obs)))


def test_a_row_write_failing_on_the_second_layer_leaves_no_rows(checkpoint, monkeypatch):
    node, fresh = make_node(checkpoint), make_node(checkpoint)
    assert len(node.steerer.hooked_layers) > 2
    actions(node, infer(OBS[0]))  # the live knobs are in the hooks
    batch = [infer(OBS[0], {"wide": 60.0}), infer(OBS[1], {"up": -40.0})]  # two settings: per-sample rows
    # Layer by layer, _write_rows stacks each layer's keep rows, then its fill rows: call 3 is layer 2's.
    fail_on_call(monkeypatch, torch, "stack", 3)
    node.infer_batch(batch)
    monkeypatch.undo()
    assert_clean_like_fresh(node, fresh)


def test_a_request_setting_write_failing_on_the_second_layer_leaves_the_live_knobs(checkpoint, monkeypatch):
    node, fresh = make_node(checkpoint), make_node(checkpoint)
    actions(node, infer(OBS[0]))  # the live knobs are in the hooks, nothing left to sync
    # _write copies each steered layer's keep, then its fill: call 3 is the second layer's keep.
    fail_on_call(monkeypatch, torch.Tensor, "copy_", 3)
    with pytest.raises(torch.OutOfMemoryError):
        node.infer(infer(OBS[0], {"wide": 60.0, "slow": 30.0}))
    monkeypatch.undo()
    assert_clean_like_fresh(node, fresh)


def test_a_sample_the_policy_cannot_run_errors_alone_and_the_rest_of_its_batch_get_their_actions(
    checkpoint, monkeypatch
):
    node = make_node(checkpoint)
    poison = {"instruction": OBS[0]["instruction"], "images": {"agentview": np.zeros((32, 32, 3), np.uint8)}}
    real = node.policy.infer_batch

    def infer_batch(observations, episodes):  # faked: a policy that cannot run an all-black image
        if any(not o.images["agentview"].any() for o in observations):
            raise ValueError("cannot run an all-black image")
        return real(observations, episodes)

    monkeypatch.setattr(node.policy, "infer_batch", infer_batch)
    batch = [infer(OBS[0], {"wide": 60.0}), infer(poison), infer(OBS[1], {}), infer(OBS[2])]
    expected = [actions(node, r) for r in batch[:1] + batch[2:]]
    replies = node.infer_batch(batch)
    assert isinstance(replies[1], ValueError) and "all-black" in str(replies[1])
    got = [r.payload.actions for r in replies[:1] + replies[2:]]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_a_batch_where_one_observation_lacks_the_state_the_policy_takes_is_refused_naming_it():
    from policies.tiny_vla import TinyVLA, TinyVLAConfig
    from vla_steer.wire import Observation

    policy = TinyVLA.build(TinyVLAConfig(state_dim=3), seed=4)
    with_state = [Observation(o["instruction"], o["images"], np.array([0.1, 0.2, 0.3])) for o in OBS[:2]]
    stateless = Observation(OBS[2]["instruction"], OBS[2]["images"])
    assert len(policy.infer_batch(with_state, [None, None])) == 2
    with pytest.raises(ValueError, match=r"observations \[1\] have none"):
        policy.infer_batch([with_state[0], stateless, with_state[1]], [None] * 3)
