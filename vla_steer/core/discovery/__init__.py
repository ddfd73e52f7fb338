"""Discovery: project value vectors onto the vocabulary, then pick each concept's neurons.

backbone --project--> Projection (saved neuron index) --lexicon or clusters--> Direction per pole
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.direction import Direction, DirectionNeuron, load_directions
from vla_steer.core.discovery.grouping import group_direction
from vla_steer.core.discovery.index import load_or_project
from vla_steer.core.discovery.lexicon import Pole, load_lexicons, select_direction
from vla_steer.core.discovery.projection import Projection, project

METHODS = ("lexicon", "clusters")

__all__ = [
    "Direction",
    "DirectionNeuron",
    "Pole",
    "Projection",
    "discover",
    "format_direction",
    "load_directions",
    "load_lexicons",
    "project",
]


def discover(
    backbone: Backbone,
    poles: dict[str, Pole],
    *,
    index_dir: str | Path | None = None,
    method: str = "lexicon",
    k: int = 20,
    rank_by: str = "logit",
    layers: tuple[int, int] | None = None,
    size: int = 16,
    min_score: float = 0.5,
    memory_budget: int = 1 << 30,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Direction]:
    """One Direction per pole; the projection is reused from `index_dir` when the model matches."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if layers is not None and not (0 <= layers[0] <= layers[1] < backbone.n_layers):
        raise ValueError(f"layer range {layers[0]}-{layers[1]} is outside 0-{backbone.n_layers - 1}")
    projection = load_or_project(
        backbone, index_dir, k, rank_by=rank_by, memory_budget=memory_budget, device=device, progress=progress
    )
    provenance = {
        "model": backbone.name,
        "model_fingerprint": backbone.fingerprint(),
        "layers_path": backbone.layers_path,
        "d_mlp": backbone.d_mlp,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = {}
    for name, pole in poles.items():
        if method == "lexicon":
            d = select_direction(
                projection, backbone.labeler, pole, size=size, layers=layers, min_score=min_score
            )
        else:
            d = group_direction(
                backbone, projection, name, sorted(pole.words), concept=pole.concept, size=size, layers=layers
            )
        d.provenance.update(provenance)
        out[name] = d
    return out


def format_direction(direction: Direction, max_tokens: int = 8) -> str:
    """A readable table of a direction's neurons: layer, neuron, sign, score and top tokens."""
    lines = [
        f"{direction.name} ({direction.concept}): {len(direction.neurons)} neurons "
        f"in layers {direction.layers or '-'} [{direction.provenance.get('method', '?')}]",
        f"  {'layer':>5} {'neuron':>7} {'sign':>4} {'score':>6}  tokens",
    ]
    for n in direction.neurons:
        tokens = ", ".join(t for t in n.tokens[:max_tokens])
        lines.append(f"  {n.layer:>5} {n.index:>7} {'+' if n.sign > 0 else '-':>4} {n.score:>6.2f}  {tokens}")
    if not direction.neurons:
        lines.append("  (no neuron scored above the threshold)")
    return "\n".join(lines)
