"""Random-neuron controls that can tell a concept from a perturbation.

Clamping any handful of neurons hard enough moves a small policy; whether a direction's effect belongs to its
concept shows only against controls that perturb the model as much as the direction does. A control draw keeps
each concept neuron's layer and sign and takes, in that layer, a neuron that resembles it in what a clamp
changes: its typical coefficient (mean and spread over the model's own forward passes, `NeuronStats`) and the
length of its value vector (how far one unit of coefficient moves the residual stream). Several independent
draws per direction give the distribution a concept's effect is placed against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.direction import Direction, DirectionNeuron

CONTROL_SUFFIX = ":random"
NEAREST = 8  # a control neuron is drawn among this many closest matches in its layer


def control_name(direction: str, draw: int) -> str:
    """`fast:random1`, `fast:random2`, ... (the analysis reads the draw back from the name)."""
    return f"{direction}{CONTROL_SUFFIX}{draw}"


@dataclass
class NeuronStats:
    """Per layer, each neuron's coefficient mean and standard deviation over every position of the forward
    passes run while measuring, and its value vector's norm. Tensors [n_layers, d_mlp]."""

    mean: torch.Tensor
    std: torch.Tensor
    value_norm: torch.Tensor
    positions: int  # token positions measured per layer

    @classmethod
    def measure(cls, backbone: Backbone, run: Callable[[], None]) -> NeuronStats:
        """Statistics of the coefficients entering each `down_proj` while `run()` runs the model."""
        n, d = backbone.n_layers, backbone.d_mlp
        total = torch.zeros(n, d, dtype=torch.float64)
        square = torch.zeros(n, d, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)

        def hook(layer: int):
            def pre(_module, args):
                m = args[0].detach().reshape(-1, d).to(torch.float64).cpu()
                total[layer] += m.sum(0)
                square[layer] += (m * m).sum(0)
                count[layer] += m.shape[0]

            return pre

        handles = [backbone.down_proj(i).register_forward_pre_hook(hook(i)) for i in range(n)]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        if not count.min() > 1:
            raise ValueError("measuring neuron statistics: the run did not pass through every layer twice")
        mean = total / count[:, None]
        var = (square / count[:, None] - mean**2).clamp_min(0.0)
        norms = torch.stack([backbone.value_vectors(i).float().norm(dim=0).cpu() for i in range(n)])
        return cls(mean.float(), var.sqrt().float(), norms, int(count.min()))

    def features(self, layer: int) -> torch.Tensor:
        """[d_mlp, 3]: mean, log spread and log value-norm, standardised within the layer."""
        f = torch.stack(
            [
                self.mean[layer],
                self.std[layer].clamp_min(1e-6).log(),
                self.value_norm[layer].clamp_min(1e-9).log(),
            ],
            dim=1,
        )
        return (f - f.mean(0)) / f.std(0).clamp_min(1e-6)


def matched_controls(
    direction: Direction,
    stats: NeuronStats,
    draws: int,
    *,
    seed: int = 0,
    exclude: Iterable[tuple[int, int]] = (),
) -> list[Direction]:
    """`draws` random controls of `direction`: per concept neuron, a neuron of the same layer and sign among
    the `NEAREST` most alike in its statistics (never a neuron in `exclude`, in the direction, or in an
    earlier draw), chosen at random."""
    g = torch.Generator().manual_seed(seed)
    taken = {(n.layer, n.index) for n in direction.neurons} | set(exclude)
    out = []
    for draw in range(1, draws + 1):
        neurons = []
        for n in direction.neurons:
            feats = stats.features(n.layer)
            dist = (feats - feats[n.index]).norm(dim=1)
            for layer_, index in taken:
                if layer_ == n.layer:
                    dist[index] = float("inf")
            nearest = torch.topk(dist, min(NEAREST, int(torch.isfinite(dist).sum())), largest=False).indices
            if nearest.numel() == 0:
                raise ValueError(
                    f"layer {n.layer} has no neuron left to draw a control of {direction.name!r}"
                )
            idx = int(nearest[torch.randint(nearest.numel(), (1,), generator=g)])
            taken.add((n.layer, idx))
            neurons.append(DirectionNeuron(n.layer, idx, n.sign))
        out.append(
            Direction(
                control_name(direction.name, draw),
                direction.concept,
                neurons,
                {
                    **direction.provenance,
                    "control_of": direction.name,
                    "draw": draw,
                    "matched_on": "layer, sign, coefficient mean and spread, value-vector norm",
                },
            )  # fmt: skip
        )
    return out


def describe_match(direction: Direction, controls: Sequence[Direction], stats: NeuronStats) -> dict:
    """Mean |coefficient mean|, spread and value norm of a direction's neurons and of each control's."""

    def summary(d: Direction) -> dict:
        idx = [(n.layer, n.index) for n in d.neurons]
        pick = lambda t: float(torch.stack([t[layer, i] for layer, i in idx]).mean())  # noqa: E731
        return {"mean": pick(stats.mean.abs()), "std": pick(stats.std), "value_norm": pick(stats.value_norm)}

    return {"direction": summary(direction), "controls": {c.name: summary(c) for c in controls}}
