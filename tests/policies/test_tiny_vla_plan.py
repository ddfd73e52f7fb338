"""The TinyVLA's plan grammar (`plan_vocab`): each plan word is decoded among the words allowed in its place,
and a grammar the tokenizer cannot honour is refused when the policy is built, naming the word."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.tiny_vla import TinyVLA, TinyVLAConfig
from vla_steer.core.steering import Neuron, Steerer
from vla_steer.wire import Observation

SPEED = ["fast", "slow", "normal"]
HEIGHT = ["high", "low", "middle"]


def _build(**cfg) -> TinyVLA:
    return TinyVLA.build(TinyVLAConfig(plan_words=2, **cfg), words=SPEED + HEIGHT, seed=1)


def test_each_plan_word_comes_from_its_place_in_the_grammar():
    free, ruled = _build(), _build(plan_vocab=[SPEED, HEIGHT])
    rng = np.random.default_rng(0)
    plans = {"free": [], "ruled": []}
    for _ in range(6):
        obs = Observation("lift the cube", {"agentview": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)})
        plans["free"].append(free.infer(obs).info["plan"].split())
        plans["ruled"].append(ruled.infer(obs).info["plan"].split())
    assert all(p[0] in SPEED and p[1] in HEIGHT for p in plans["ruled"]), plans
    # The same random weights without the grammar say other words: the rule is what keeps them in place.
    assert any(p[0] not in SPEED or p[1] not in HEIGHT for p in plans["free"]), plans
    assert ruled.backbone.plans and not ruled.backbone.planning  # reset after each inference


def test_a_grammar_the_tokenizer_cannot_honour_is_refused():
    with pytest.raises(ValueError, match="plan_vocab must list the allowed words of each of the 2"):
        _build(plan_vocab=[SPEED])
    with pytest.raises(ValueError, match="plan word 2's 'skyward' is not one word token"):
        _build(plan_vocab=[SPEED, ["high", "skyward"]])


def _actions_after(policy: TinyVLA, observations, prompt: list[int], plan: torch.Tensor) -> torch.Tensor:
    """Reference: the action ids greedy decoding gives after the prompt and `plan`, each token by a full
    forward without a cache and without steering."""
    lm, ids = policy.language_model, torch.cat([torch.tensor([prompt] * len(observations)), plan], dim=1)
    prefix = policy.prefix_embeddings(
        policy.preprocess(np.stack([o.images["agentview"] for o in observations])), None
    )
    bins = torch.full((lm.config.vocab_size,), float("-inf"))
    bins[policy.bins.first_id : policy.bins.vocab_size] = 0.0
    with torch.no_grad():
        for _ in range(policy.cfg.action_dim):
            logits = lm(inputs_embeds=torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)).logits[
                :, -1
            ]
            ids = torch.cat([ids, (logits + bins).argmax(-1, keepdim=True)], dim=1)
    return ids[:, -policy.cfg.action_dim :]


def test_a_steered_plan_is_followed_by_the_actions_of_an_unsteered_context():
    """Steering at positions="plan" changes which plan words are chosen; the action tokens are then those
    the unsteered policy decodes after that plan. Before, the steered keys and values that chose the plan
    stayed in the cache and also pushed the actions (on the demo VLA they damped a "fast" plan by a quarter)."""
    policy = _build(plan_vocab=[SPEED, HEIGHT])
    rng = np.random.default_rng(3)
    observations = [
        Observation("lift the cube", {"agentview": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)})
        for _ in range(6)
    ]
    prompt = policy.prompt_ids("lift the cube")
    neurons = [Neuron(layer, index) for layer in range(policy.backbone.n_layers) for index in range(0, 64, 4)]
    unsteered = policy.batch_token_ids(observations, [prompt] * len(observations))
    with Steerer(policy.backbone, positions="plan") as steerer:
        steerer.add("c", neurons, strength=40.0)
        steered = policy.batch_token_ids(observations, [prompt] * len(observations))
    plan = steered[:, : policy.cfg.plan_words]
    assert not torch.equal(plan, unsteered[:, : policy.cfg.plan_words])  # the steering changed plans
    assert torch.equal(
        steered[:, policy.cfg.plan_words :], _actions_after(policy, observations, prompt, plan)
    )
    assert torch.equal(
        unsteered[:, policy.cfg.plan_words :], _actions_after(policy, observations, prompt, unsteered[:, :2])
    )
