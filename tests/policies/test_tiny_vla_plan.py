"""The TinyVLA's plan grammar (`plan_vocab`): each plan word is decoded among the words allowed in its place,
and a grammar the tokenizer cannot honour is refused when the policy is built, naming the word."""

from __future__ import annotations

import numpy as np
import pytest

from policies.tiny_vla import TinyVLA, TinyVLAConfig
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
