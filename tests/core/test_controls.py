"""Random-neuron controls matched to a direction's neurons, on a real (tiny, random) transformers Llama."""

from __future__ import annotations

import pytest
import torch

from vla_steer.core.discovery.controls import NeuronStats, control_name, describe_match, matched_controls
from vla_steer.core.discovery.direction import Direction, DirectionNeuron


def measure(bb) -> NeuronStats:
    ids = torch.randint(5, bb.vocab_size - 300, (3, 12), generator=torch.Generator().manual_seed(0))
    return NeuronStats.measure(bb, lambda: bb.root(input_ids=ids))


def test_statistics_are_the_coefficients_entering_each_down_proj(llama):
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = {}
    handle = llama.down_proj(2).register_forward_pre_hook(lambda _m, a: seen.setdefault("m", a[0].detach()))
    try:
        stats = NeuronStats.measure(llama, lambda: llama.root(input_ids=ids))
    finally:
        handle.remove()
    m = seen["m"].reshape(-1, llama.d_mlp).double()
    assert stats.positions == 18 and stats.mean.shape == (llama.n_layers, llama.d_mlp)
    torch.testing.assert_close(stats.mean[2].double(), m.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.std[2].double(), m.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.value_norm[2], llama.value_vectors(2).norm(dim=0))
    # Hooks are gone afterwards, and a run that never reaches the model is refused.
    assert not llama.down_proj(2)._forward_pre_hooks
    with pytest.raises(ValueError, match="every layer"):
        NeuronStats.measure(llama, lambda: None)


def test_controls_keep_layers_and_signs_and_match_the_neurons_statistics(llama):
    stats = measure(llama)
    neurons = [DirectionNeuron(1, 3, 1.0), DirectionNeuron(1, 40, -1.0), DirectionNeuron(3, 7, 1.0)]
    d = Direction("fast", "speed", neurons)
    other = {(3, 8), (3, 9)}
    draws = matched_controls(d, stats, 3, seed=0, exclude=other)
    assert [c.name for c in draws] == [control_name("fast", k) for k in (1, 2, 3)] == ["fast:random1",
                                                                                          "fast:random2", "fast:random3"]  # fmt: skip
    used = [(n.layer, n.index) for c in draws for n in c.neurons]
    assert len(set(used)) == len(used)  # independent draws: no neuron twice
    assert not set(used) & ({(n.layer, n.index) for n in neurons} | other)
    for c in draws:
        assert [(n.layer, n.sign) for n in c.neurons] == [(n.layer, n.sign) for n in neurons]
        assert c.provenance["control_of"] == "fast" and c.concept == "speed"
    # Matched: each control neuron is closer to its concept neuron in the statistics than a typical neuron.
    for c in draws:
        for n, m in zip(neurons, c.neurons, strict=True):
            f = stats.features(n.layer)
            dist = (f - f[n.index]).norm(dim=1)
            assert dist[m.index] < dist.median(), (n, m)
    assert describe_match(d, draws, stats)["controls"].keys() == {c.name for c in draws}
    # Seeded: the same draws again; another seed, other draws.
    again = matched_controls(d, stats, 3, seed=0, exclude=other)
    assert [c.neurons for c in again] == [c.neurons for c in draws]
    assert [c.neurons for c in matched_controls(d, stats, 3, seed=1, exclude=other)] != [
        c.neurons for c in draws
    ]


def test_a_layer_with_no_neuron_left_is_refused(llama):
    stats = measure(llama)
    d = Direction("up", "height", [DirectionNeuron(0, 0, 1.0)])
    everyone = {(0, i) for i in range(1, llama.d_mlp)}
    with pytest.raises(ValueError, match="layer 0 has no neuron left"):
        matched_controls(d, stats, 1, exclude=everyone)
