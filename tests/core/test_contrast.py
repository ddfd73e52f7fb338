"""Contrast discovery: neurons planted to respond to one prompt word are found, on a plain Gemma LM and on
pi0's action expert (no vocabulary), and come back as steerable Directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pi0 import make_obs, noise_of, tiny_config, tiny_stats

from policies.pi0.policy import PI0Policy
from vla_steer.core import tiny
from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.contrast import contrast_directions, instruction_variants, record_moments
from vla_steer.core.discovery.direction import Direction
from vla_steer.core.steering import Steerer

PROMPTS = [
    "pick up the cup",
    "move the red block to the left",
    "put the bowl on the plate",
    "open the drawer",
]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"])


def word_id(tok, word: str) -> int:
    ids = tok.encode(word, add_special_tokens=False)
    assert len(ids) == 1, f"{word!r} is not one token in the test tokenizer: {ids}"
    return ids[0]


def test_planted_neuron_in_a_language_model_is_found(tok):
    model = tiny.build_gemma(tok, hidden=64, layers=2, intermediate=96, seed=3)
    backbone = Backbone.from_model(model, tok)
    quick = model.model.embed_tokens.weight[word_id(tok, "quickly")].detach()
    planted = 41
    with torch.no_grad():  # neuron (0, 41) fires when the residual points along "quickly"'s embedding
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[planted] = 3.0 * quick / quick.norm()
        mlp.up_proj.weight[planted] = 3.0 * quick / quick.norm()

    def run(text: str):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            model(input_ids=ids)

    fast, slow = contrast_directions(
        backbone, run, [f"{p} quickly" for p in PROMPTS], [f"{p} slowly" for p in PROMPTS],
        name="fast", opposite="slow", concept="speed", k=5,
    )  # fmt: skip
    top = fast.neurons[0]
    assert (top.layer, top.index, top.sign) == (0, planted, 1.0)
    assert top.score > 3 * fast.neurons[1].score
    assert [n.sign for n in slow.neurons] == [-n.sign for n in fast.neurons]
    assert (
        fast.provenance["method"] == "contrast"
        and fast.provenance["model_fingerprint"] == backbone.fingerprint()
    )
    assert Direction.from_dict(fast.to_dict()).neurons == fast.neurons  # saves like any direction


def test_planted_expert_neuron_is_found_through_the_prefix_cache(tok):
    """pi0's expert sees the prompt only through the prefix keys/values: plant a path word -> expert neuron."""
    cfg = tiny_config(vocab_size=len(tok))
    policy = PI0Policy.build(cfg, tok, seed=4, stats=tiny_stats())
    model = policy.model
    lm, expert = model.paligemma_with_expert.language_model, model.paligemma_with_expert.expert
    quick = lm.embed_tokens.weight[word_id(tok, "quickly")].detach()
    g = torch.randn(32, generator=torch.Generator().manual_seed(0))
    g = g / g.norm()
    planted = 17
    with torch.no_grad():
        lm.layers[0].self_attn.v_proj.weight.zero_()
        u = quick / quick.norm()
        lm.layers[0].self_attn.v_proj.weight[0] = u  # value dim 0: "is this 'quickly'?"
        proj = model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear
        proj.weight -= torch.outer(u, u @ proj.weight)  # image tokens carry nothing along u
        proj.bias -= u * (u @ proj.bias)
        att = expert.layers[0].self_attn
        att.q_proj.weight.zero_()  # uniform attention over everything visible
        att.v_proj.weight.zero_()
        att.o_proj.weight.zero_()
        att.o_proj.weight[:, 0] = 100.0 * g  # value dim 0 of head 0 -> direction g of the expert stream
        mlp = expert.layers[0].mlp
        mlp.gate_proj.weight[planted] = 4.0 * g
        mlp.up_proj.weight[planted] = 4.0 * g
        mlp.down_proj.weight[:, planted] = 0.0  # it fires, and writes nothing downstream
    observations = [make_obs(seed=i, instruction=p) for i, p in enumerate(PROMPTS)]
    noises = {p: noise_of(i) for i, p in enumerate(PROMPTS)}

    def run(obs):  # the same noise for both prompt variants of an observation
        base = obs.instruction.rsplit(" ", 1)[0]
        policy.infer(obs, noise=noises[base])

    backbone = policy.backbones["action_expert"]
    fast, slow = contrast_directions(
        backbone, run,
        instruction_variants(observations, "{instruction} quickly"),
        instruction_variants(observations, "{instruction} slowly"),
        name="fast", opposite="slow", backbone_key="action_expert", k=8,
    )  # fmt: skip
    top = fast.neurons[0]
    assert (top.layer, top.index, top.sign) == (0, planted, 1.0)
    assert fast.provenance["backbone"] == slow.provenance["backbone"] == "action_expert"
    assert fast.provenance["n_positions"]["positive"] == len(PROMPTS) * cfg.num_inference_steps * (
        1 + cfg.chunk_size
    )

    # the found direction steers the expert: a Steerer on it changes the chunk; off is bit-identical
    obs = observations[0]
    plain = policy.infer(obs, noise=noise_of(9)).actions
    steerer = Steerer(backbone)
    steerer.add_direction(fast, strength=0.0, enabled=False)
    with steerer.apply(fast=-20.0):
        steered = policy.infer(obs, noise=noise_of(9)).actions
    assert np.abs(steered - plain).max() > 1e-3
    np.testing.assert_array_equal(policy.infer(obs, noise=noise_of(9)).actions, plain)
    steerer.remove()


def test_record_moments_counts_and_refuses_silent_runs(tok):
    model = tiny.build_gemma(tok, hidden=32, layers=2, intermediate=48, seed=5)
    backbone = Backbone.from_model(model, tok)

    def run(n: int):
        with torch.no_grad():
            model(input_ids=torch.arange(1, n + 1)[None])

    mom, layers = record_moments(backbone, run, [3, 5])
    assert mom.count == 8 and layers == [0, 1] and mom.mean.shape == (2, 48)
    mom, _ = record_moments(backbone, run, [3, 5], positions="last")
    assert mom.count == 2
    with pytest.raises(ValueError, match="no activations recorded"):
        record_moments(backbone, lambda item: None, [1])
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        record_moments(backbone, run, [1], layers=[7])
