"""Direction discovery by contrast: which neurons fire differently between two sets of inputs.

For a stack with no vocabulary (pi0's action expert) the projection cannot say what a neuron means,
but behaviour can: run the policy on the same logged observations with two prompt variants
("... quickly" / "... slowly"), average every neuron's coefficient `m` (the input of `down_proj`) over
the recorded forwards and token positions, and keep the neurons whose means differ most. Scores:
`statistic="layer"` (default) divides the difference by the layer's RMS coefficient over both sets, so
layers of different scale compete fairly while a neuron that moves a lot stands out; `"neuron"` is
Cohen's d (pooled per-neuron standard deviation), which also favours small but very consistent shifts. The direction's neurons carry the sign of the difference: clamping
them at `sign * strength` pushes towards the positive set; the opposite pole is the same neurons with
the signs flipped.

Works on any `Backbone` (with or without unembedding); `run(item)` is whatever makes the model see
one input (`policy.infer(obs, noise=fixed)`, a plain LM forward, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.direction import Direction, DirectionNeuron


@dataclass
class Moments:
    """Running per-neuron sums over every recorded token position: [layers, d_mlp] float64."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1) - self.mean**2).clamp_min(0.0)


def record_moments(
    backbone: Backbone,
    run: Callable[[object], object],
    items: Iterable[object],
    *,
    layers: Iterable[int] | None = None,
    positions: str = "all",
) -> tuple[Moments, list[int]]:
    """Mean and variance of every neuron's coefficient over all inputs, forwards and positions.

    `positions`: "all" token positions of every forward, or only the "last" one of each.
    """
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    layers = sorted(set(range(backbone.n_layers) if layers is None else layers))
    bad = [layer for layer in layers if not 0 <= layer < backbone.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{backbone.n_layers - 1}")
    d = backbone.d_mlp
    mom = Moments(
        torch.zeros(len(layers), d, dtype=torch.float64), torch.zeros(len(layers), d, dtype=torch.float64)
    )
    counts = [0] * len(layers)

    def hook_for(row: int):
        def hook(module, args):
            m = args[0].detach().reshape(-1, d)
            if positions == "last":
                m = m[-1:]
            m = m.double().cpu()
            mom.total[row] += m.sum(0)
            mom.squares[row] += (m * m).sum(0)
            counts[row] += m.shape[0]

        return hook

    # prepend: record what the model computed, before any steering hook rewrites it
    handles = [
        backbone.down_proj(layer).register_forward_pre_hook(hook_for(row), prepend=True)
        for row, layer in enumerate(layers)
    ]
    try:
        for item in items:
            run(item)
    finally:
        for h in handles:
            h.remove()
    if len(set(counts)) > 1:
        raise RuntimeError(f"layers saw different numbers of positions {counts}; the stack ran partially")
    mom.count = counts[0] if counts else 0
    if mom.count == 0:
        raise ValueError("no activations recorded: no inputs, or run() never reached the backbone")
    return mom, layers


def contrast_directions(
    backbone: Backbone,
    run: Callable[[object], object],
    positive: Iterable[object],
    negative: Iterable[object],
    *,
    name: str,
    opposite: str | None = None,
    concept: str | None = None,
    backbone_key: str = "language",
    k: int = 16,
    layers: Iterable[int] | None = None,
    positions: str = "all",
    statistic: str = "layer",
    min_score: float = 0.0,
) -> list[Direction]:
    """The `k` neurons whose mean coefficient differs most between the two input sets.

    Returns `[Direction(name)]`, plus `Direction(opposite)` (signs flipped) when `opposite` is given.
    `backbone_key` goes into provenance["backbone"] (which stack of the policy to steer).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if statistic not in ("layer", "neuron"):
        raise ValueError(f"statistic must be 'layer' or 'neuron', got {statistic!r}")
    pos, layer_ids = record_moments(backbone, run, positive, layers=layers, positions=positions)
    neg, _ = record_moments(backbone, run, negative, layers=layer_ids, positions=positions)
    diff = pos.mean - neg.mean
    if statistic == "neuron":
        scale = ((pos.var + neg.var) / 2).sqrt()
    else:
        second = (pos.squares + neg.squares) / (pos.count + neg.count)  # [layers, d_mlp]
        scale = second.mean(dim=1, keepdim=True).sqrt().expand_as(diff)
    score = diff / (scale + 1e-6 * float(scale.mean()) + 1e-12)
    flat = score.abs().reshape(-1)
    top = torch.topk(flat, min(k, flat.numel()))
    neurons = []
    for value, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        if value <= min_score:
            break
        row, index = divmod(idx, backbone.d_mlp)
        sign = 1.0 if diff[row, index] > 0 else -1.0
        neurons.append(DirectionNeuron(layer_ids[row], index, sign, float(value), []))
    if not neurons:
        raise ValueError(f"no neuron differs by more than min_score={min_score} between the two sets")
    provenance = {
        "method": "contrast",
        "backbone": backbone_key,
        "model_fingerprint": backbone.fingerprint(),
        "statistic": statistic,
        "positions": positions,
        "n_positions": {"positive": pos.count, "negative": neg.count},
        "layers": layer_ids,
        "k": k,
    }
    concept = concept or (f"{name}-{opposite}" if opposite else name)
    out = [Direction(name, concept, neurons, dict(provenance, pole="positive"))]
    if opposite:
        flipped = [replace(n, sign=-n.sign) for n in neurons]
        out.append(Direction(opposite, concept, flipped, dict(provenance, pole="negative")))
    return out


def instruction_variants(
    observations: Iterable[object], template: str, *, field: str = "instruction"
) -> list[object]:
    """Copies of dataclass observations with `template.format(instruction=...)` as their instruction,
    e.g. "{instruction} quickly"; the rest (images, state) is shared, so only the prompt differs."""
    out = []
    for obs in observations:
        text = getattr(obs, field).strip().rstrip(".")
        out.append(replace(obs, **{field: template.format(instruction=text)}))
    return out
