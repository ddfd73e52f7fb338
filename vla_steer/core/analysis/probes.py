"""Activation analyses: which logged neurons track the arm's speed and height, and where concept neurons sit.

Activations come back from the policy node with every inference (`--activations fast,layer:3`) and are
stored per step as [forwards, neurons], recorded before steering is applied: the neuron's own response.
Each neuron's activation at the prefill's last position is correlated (Pearson, over every logged step of
every episode) with the end-effector speed and height after that step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vla_steer.core.activations import layer_of
from vla_steer.core.discovery.direction import Direction
from vla_steer.core.rollouts import Store


@dataclass
class NeuronTrack:
    source: str  # the logged activation ("fast", "layer:3")
    layer: int | None
    index: int | None  # neuron index in its layer (None if the source's neurons are unknown)
    column: int
    r_speed: float
    r_height: float
    tokens: list[str]


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correlation of each column of x [T, N] with y [T]; 0 where a column is constant."""
    xc, yc = x - x.mean(0), y - y.mean()
    den = np.sqrt((xc**2).sum(0) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc[:, None]).sum(0) / den
    return np.nan_to_num(r)


def neuron_tracks(store: Store, directions: Mapping[str, Direction] | None = None) -> list[NeuronTrack]:
    """One row per logged neuron, sorted by the larger of |r_speed| and |r_height|."""
    acts: dict[str, list[np.ndarray]] = {}
    speed: list[np.ndarray] = []
    height: list[np.ndarray] = []
    for info in store.episodes():
        ep = store.load(info.id, images=False)
        if not ep.activations or ep.n_steps < 2:
            continue
        names = sorted(ep.activations)
        if acts and names != sorted(acts):
            continue  # a different selection was logged: not comparable column by column
        for name in names:
            a = ep.activations[name]
            acts.setdefault(name, []).append(a[:, 0] if a.ndim == 3 else a)
        speed.append(np.linalg.norm(ep.arrays["ee_vel"], axis=1))
        height.append(ep.arrays["ee_pos"][:, 2])
    if not acts:
        return []
    s, h = np.concatenate(speed), np.concatenate(height)
    rows = []
    for name, parts in acts.items():
        x = np.concatenate(parts).astype(np.float64)
        rs, rh = _pearson(x, s), _pearson(x, h)
        layer_n = layer_of(name)  # the node refuses malformed layer names, so a store holds none
        neurons = directions.get(name).neurons if directions and name in directions else None
        for col in range(x.shape[1]):
            if layer_n is not None:
                layer, index, tokens = layer_n, col, []
            elif neurons is not None and col < len(neurons):
                n = neurons[col]
                layer, index, tokens = n.layer, n.index, list(n.tokens)
            else:
                layer, index, tokens = None, None, []
            rows.append(NeuronTrack(name, layer, index, col, float(rs[col]), float(rh[col]), tokens))
    rows.sort(key=lambda r: -max(abs(r.r_speed), abs(r.r_height)))
    return rows


def layer_histogram(directions: Mapping[str, Direction], n_layers: int | None = None) -> dict[str, list[int]]:
    """Direction name -> number of its neurons in each layer."""
    if not directions:
        return {}
    n = n_layers or 1 + max((nn.layer for d in directions.values() for nn in d.neurons), default=0)
    out = {}
    for name, d in directions.items():
        counts = [0] * n
        for nn in d.neurons:
            counts[nn.layer] += 1
        out[name] = counts
    return out
