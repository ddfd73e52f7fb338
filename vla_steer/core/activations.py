"""Recording chosen neuron coefficients during inference (a bounded selection, never whole layers).

The recorder reads the input of `down_proj`, the coefficients `m`, at the last token position of every
forward (the prefill, then each decoded token). Its hook runs before the Steerer's, so it records what
the model computed, not the value steering imposed; the steering state is logged beside it.

What a node's client may ask for (`select`): a concept name (the coefficients of that concept's neurons) or
`layer:N` (every coefficient of layer N of the language stack); `recording` records them for one inference.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from vla_steer.core.backbone import Backbone
from vla_steer.wire import Code, ProtocolError

MAX_NEURONS = 4096
Selection = list[tuple[str, str, list[tuple[int, int]]]]  # (name, steered stack, neurons) per activation
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
            last = m[:, -1] if m.dim() == 3 else m.reshape(-1, m.shape[-1])[-1:]  # [batch, d_mlp]
            self._rows[layer].append(last[:, index].detach().float().cpu())

        return hook

    def result(self, row: int = 0) -> np.ndarray:
        """[n_forwards, n_neurons] float32 in the order the neurons were requested, for sample `row` of
        batched forwards (each forward's last position)."""
        if not self.neurons:
            return np.zeros((0, 0), np.float32)
        n = min(len(rows) for rows in self._rows.values())
        out = np.zeros((n, len(self.neurons)), np.float32)
        for layer, cols in self._cols.items():
            if n:
                out[:, cols] = torch.stack([r[row] for r in self._rows[layer][:n]]).numpy()
        return out


def select(
    names: Iterable[str],
    backbone: Backbone,
    concepts: Mapping[str, tuple[str, list[tuple[int, int]]]],
    max_neurons: int,
) -> Selection:
    """The activations a request names, each once, in order: `layer:N` of the language `backbone`, or a
    concept of `concepts` (name -> (stack, neurons)). A bad name or a selection over `max_neurons` is a
    ProtocolError naming the field "activations"."""
    out: Selection = []
    for name in dict.fromkeys(names):
        try:
            layer = layer_of(name)
        except ValueError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e), "activations") from None
        if layer is not None:
            if layer >= backbone.n_layers:
                raise ProtocolError(
                    Code.BAD_PAYLOAD,
                    f"activation {name!r}: the model has {backbone.n_layers} layers",
                    "activations",
                )
            out.append((name, "language", [(layer, i) for i in range(backbone.d_mlp)]))
        elif name in concepts:
            out.append((name, *concepts[name]))
        else:
            raise ProtocolError(
                Code.BAD_PAYLOAD,
                f"unknown activation {name!r}: ask for a concept ({sorted(concepts)}) or 'layer:N'",
                "activations",
            )
    total = sum(len(ns) for _, _, ns in out)
    if total > max_neurons:
        raise ProtocolError(
            Code.TOO_LARGE,
            f"{total} neurons requested; this node records at most {max_neurons}",
            "activations",
        )
    return out


@contextlib.contextmanager
def recording(
    selection: Selection, backbones: Mapping[str, Backbone], max_neurons: int
) -> Iterator[Callable[..., dict[str, np.ndarray]]]:
    """Record `selection` during the block (one recorder per stack); the function it yields returns, after
    the forward, name -> float32 [forwards, neurons] of batch sample `row` (default 0)."""
    groups: dict[str, list[tuple[str, list[tuple[int, int]]]]] = {}
    for name, key, neurons in selection:
        groups.setdefault(key, []).append((name, neurons))
    with contextlib.ExitStack() as stack:
        recorders = [
            (
                stack.enter_context(
                    ActivationRecorder(
                        backbones[key], [n for _, ns in group for n in ns], max_neurons=max_neurons
                    )
                ),
                group,
            )
            for key, group in groups.items()
        ]

        def result(row: int = 0) -> dict[str, np.ndarray]:
            out = {}
            for rec, group in recorders:
                values, col = rec.result(row), 0
                for name, neurons in group:
                    out[name] = np.ascontiguousarray(values[:, col : col + len(neurons)])
                    col += len(neurons)
            return out

        yield result
