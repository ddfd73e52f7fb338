"""bfloat16 loading of pi0, pi0.5 and pi0-FAST keeps LeRobot's float32 parameters (the vision path and every
RMSNorm, pi0.5's adaptive norms' dense included) and stays close to the float32 policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pi0 import (
    STATE_CORPUS,
    make_obs,
    noise_of,
    tiny_config,
    tiny_pi05_config,
    tiny_pi05_stats,
    tiny_stats,
)

from policies.pi0.modeling import FLOAT32_PARAMS
from policies.pi0.policy import PI0Policy
from policies.pi0_fast import PI0FastPolicy
from policies.pi0_fast.tiny import tiny_policy
from policies.pi05 import PI05Policy
from vla_steer.core import tiny

# Unnormalised actions of magnitude up to ~4; bfloat16 keeps ~3 significant digits: the gap seen is < 0.01.
ATOL = 0.05


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"], corpus=STATE_CORPUS)
    root = tmp_path_factory.mktemp("bf16")
    return {
        "pi0": (PI0Policy, PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, stats=tiny_stats()).save(root / "pi0")),
        "pi05": (PI05Policy, PI05Policy.build(tiny_pi05_config(vocab_size=len(tok)), tok,
                                              stats=tiny_pi05_stats()).save(root / "pi05")),
        "pi0_fast": (PI0FastPolicy, tiny_policy().save(root / "pi0_fast")),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["pi0", "pi05", "pi0_fast"])
def test_bfloat16_keeps_lerobots_float32_params_and_stays_close(saved, kind):
    cls, path = saved[kind]
    half = cls.load(path, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    kept = {n for n in dtypes if any(part in n for part in FLOAT32_PARAMS)}
    assert any("vision_tower" in n for n in kept) and any(n.endswith("model.norm.weight") or
                                                          "model.norm.dense" in n for n in kept)  # fmt: skip
    if kind == "pi05":
        assert any("input_layernorm.dense" in n for n in kept)
    assert all(dtypes[n] == torch.float32 for n in kept), [n for n in kept if dtypes[n] != torch.float32]
    assert all(dtypes[n] == torch.bfloat16 for n in set(dtypes) - kept)
    full = cls.load(path)
    obs = make_obs()
    args = {} if kind == "pi0_fast" else {"noise": noise_of(0)}
    got, want = half.infer(obs, **args), full.infer(obs, **args)
    if kind == "pi0_fast":  # greedy: the same tokens, so the same actions
        assert got.info["action_tokens"] == want.info["action_tokens"]
    np.testing.assert_allclose(got.actions, want.actions, atol=ATOL)
