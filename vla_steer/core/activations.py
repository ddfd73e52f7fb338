"""Recording chosen neuron coefficients during inference (a bounded selection, never whole layers).

The recorder reads the input of `down_proj`, the coefficients `m`, at the last token position of every
forward (the prefill, then each decoded token). Its hook runs before the Steerer's, so it records what
the model computed, not the value steering imposed; the steering state is logged beside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import torch

from vla_steer.core.backbone import Backbone

MAX_NEURONS = 4096
LAYER_PREFIX = "layer:"
_LAYER = re.compile(r"layer:([0-9]{1,6})")  # ASCII digits only; fullmatch, so no trailing newline


def layer_of(name: str) -> int | None:
    """N for the activation name `layer:N` (every coefficient of layer N), None for any other name.

    Strict: N is 1-6 ASCII digits and nothing else, so `layer:\u0663` (an Arabic-Indic 3) or `layer:3\n`
    raise ValueError instead of quietly reading as layer 3.
    """
    if not name.startswith(LAYER_PREFIX):
        return None
    m = _LAYER.fullmatch(name)
    if m is None:
        raise ValueError(
            f"activation {name!r}: a layer is named {LAYER_PREFIX}N with N in ASCII digits 0-9 and nothing "
            "else (e.g. layer:3)"
        )
    return int(m.group(1))


class ActivationRecorder:
    """`with ActivationRecorder(backbone, [(layer, neuron), ...]) as rec: ...; rec.result()` -> [forwards, n]."""

    def __init__(
        self, backbone: Backbone, neurons: Iterable[tuple[int, int]], *, max_neurons: int = MAX_NEURONS
    ):
        self.neurons = [(int(layer), int(idx)) for layer, idx in neurons]
        if len(self.neurons) > max_neurons:
            raise ValueError(
                f"{len(self.neurons)} neurons requested; at most {max_neurons} are recorded per request"
            )
        for layer, idx in self.neurons:
            if not (0 <= layer < backbone.n_layers and 0 <= idx < backbone.d_mlp):
                raise ValueError(
                    f"neuron ({layer}, {idx}) out of range ({backbone.n_layers} layers x {backbone.d_mlp})"
                )
        self.backbone = backbone
        self._cols: dict[int, list[int]] = {}  # layer -> columns of the result it fills
        for col, (layer, _) in enumerate(self.neurons):
            self._cols.setdefault(layer, []).append(col)
        self._rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in self._cols}
        self._handles = []

    def __enter__(self) -> ActivationRecorder:
        for layer, cols in self._cols.items():
            down = self.backbone.down_proj(layer)
            index = torch.tensor([self.neurons[c][1] for c in cols], device=down.weight.device)
            self._handles.append(down.register_forward_pre_hook(self._hook(layer, index), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int, index: torch.Tensor):
        def hook(module, args):
            m = args[0]
            self._rows[layer].append(m.reshape(-1, m.shape[-1])[-1, index].detach().float().cpu())

        return hook

    def result(self) -> np.ndarray:
        """[n_forwards, n_neurons] float32 in the order the neurons were requested."""
        if not self.neurons:
            return np.zeros((0, 0), np.float32)
        n = min(len(rows) for rows in self._rows.values())
        out = np.zeros((n, len(self.neurons)), np.float32)
        for layer, cols in self._cols.items():
            if n:
                out[:, cols] = torch.stack(self._rows[layer][:n]).numpy()
        return out
