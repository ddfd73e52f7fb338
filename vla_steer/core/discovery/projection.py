"""Project every FFN value vector onto the output vocabulary, in bounded memory.

For neuron i of a layer, `logits_i = W_U_eff @ v_i` with `v_i = down_proj.weight[:, i]` and `W_U_eff` the
unembedding with the final-norm gain folded in. The full [neurons x vocab] matrix is never built: the
vocabulary is cut into tiles and the neurons into chunks, each block is reduced to its top-k and
bottom-k at once, and the running top-k lists are merged. Extra memory stays under `memory_budget`
whatever the model (PaliGemma: 294,912 neurons x 257,152 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vla_steer.core.backbone import Backbone

RANK_BY = ("logit", "cosine")
_F32 = 4  # bytes


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Tiling:
    """How the projection is cut: `vocab_tile` tokens x `neuron_chunk` neurons per block."""

    vocab_tile: int
    neuron_chunk: int

    @classmethod
    def for_budget(cls, vocab: int, d_model: int, d_mlp: int, k: int, budget: int) -> Tiling:
        # Half the budget holds the float32 unembedding tile; the other half one logit block
        # plus the per-chunk value vectors and merge buffers. (The per-neuron running top-k lists,
        # [layers, d_mlp, k], are the output, not scratch.)
        vocab_tile = max(1, min(vocab, (budget // 2) // (d_model * _F32)))
        per_neuron = (vocab_tile + d_model + 8 * k) * _F32
        neuron_chunk = max(1, min(d_mlp, (budget - vocab_tile * d_model * _F32) // per_neuron))
        return cls(vocab_tile, neuron_chunk)

    def peak_bytes(self, d_model: int, k: int) -> int:
        return (self.vocab_tile * d_model + self.neuron_chunk * (self.vocab_tile + d_model + 8 * k)) * _F32


@dataclass
class Projection:
    """Per layer, per neuron: the k tokens each value vector promotes most (top) and least (bottom).

    Tensors are [n_layers, d_mlp, k]; `*_ids` int64 token ids ordered by `rank_by`,
    `*_logit` the raw projection `W_U_eff @ v`, `*_cos` its cosine-normalised form.
    """

    top_ids: torch.Tensor
    top_logit: torch.Tensor
    top_cos: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logit: torch.Tensor
    bottom_cos: torch.Tensor
    layers: list[int]
    rank_by: str
    k: int

    @property
    def d_mlp(self) -> int:
        return self.top_ids.shape[1]

    def row(self, layer: int) -> int:
        """Index into the first tensor dimension for a model layer."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not projected (projected: {self.layers})") from None


def project(
    backbone: Backbone,
    k: int = 20,
    *,
    rank_by: str = "logit",
    layers: list[int] | None = None,
    memory_budget: int = 1 << 30,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> Projection:
    """Top-k and bottom-k vocabulary tokens of every value vector of the chosen layers."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    dev = resolve_device(device)
    layers = list(range(backbone.n_layers)) if layers is None else sorted(layers)
    bad = [i for i in layers if not 0 <= i < backbone.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {backbone.n_layers} layers")
    vocab, d_model, d_mlp = backbone.vocab_size, backbone.d_model, backbone.d_mlp
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    tiling = Tiling.for_budget(vocab, d_model, d_mlp, k, memory_budget)

    n_tiles = -(-vocab // tiling.vocab_tile)
    n_chunks = -(-d_mlp // tiling.neuron_chunk)
    shape = (len(layers), d_mlp, k)
    best = {
        side: (torch.full(shape, float("-inf"), device=dev), torch.zeros(shape, dtype=torch.long, device=dev))
        for side in ("top", "bottom")
    }
    w_norm = torch.empty(vocab, device=dev)  # row norms of W_U_eff, for the cosine score
    v_norm = torch.stack([backbone.value_vectors(i).float().norm(dim=0) for i in layers]).to(dev)

    bar = tqdm(total=n_tiles * len(layers) * n_chunks, desc="projecting", unit="block", disable=not progress)
    with torch.no_grad():
        for t0 in range(0, vocab, tiling.vocab_tile):
            t1 = min(vocab, t0 + tiling.vocab_tile)
            w = backbone.effective_unembedding(slice(t0, t1)).to(dev)  # [Tv, d]
            w_norm[t0:t1] = w.norm(dim=1)
            for row, layer in enumerate(layers):
                weight = backbone.value_vectors(layer)
                for n0 in range(0, d_mlp, tiling.neuron_chunk):
                    n1 = min(d_mlp, n0 + tiling.neuron_chunk)
                    v = weight[:, n0:n1].to(dev, torch.float32)  # [d, Tn]
                    block = v.T @ w.T  # [Tn, Tv]
                    if rank_by == "cosine":
                        # In place, one factor at a time: no second [Tn, Tv] tensor.
                        block.div_(w_norm[t0:t1].clamp_min(1e-12)[None, :])
                        block.div_(v_norm[row, n0:n1].clamp_min(1e-12)[:, None])
                    kk = min(k, t1 - t0)
                    for side, largest in (("top", True), ("bottom", False)):
                        vals, ids = torch.topk(block, kk, dim=1, largest=largest)
                        if not largest:
                            vals = -vals  # keep every running list "larger is better"
                        _merge(best[side], row, n0, n1, vals, ids + t0, k)
                    del block, vals, ids  # before the next block is allocated: one block alive at a time
                    bar.update(1)
            del w
    bar.close()

    # Each kept score gives the other: cosine = logit / (|w_t| |v_i|); zero-norm rows score 0 in both.
    out: dict[str, torch.Tensor] = {}
    for side, sign in (("top", 1.0), ("bottom", -1.0)):
        score, ids = best[side]
        score = score * sign
        norms = w_norm[ids] * v_norm[:, :, None]
        if rank_by == "logit":
            logit, cos = score, score / norms.clamp_min(1e-12)
        else:
            logit, cos = score * norms, score
        out[f"{side}_ids"], out[f"{side}_logit"], out[f"{side}_cos"] = ids.cpu(), logit.cpu(), cos.cpu()
    return Projection(**out, layers=layers, rank_by=rank_by, k=k)


def _merge(state: tuple[torch.Tensor, torch.Tensor], row: int, n0: int, n1: int, vals, ids, k: int) -> None:
    best_v, best_i = state
    cat_v = torch.cat([best_v[row, n0:n1], vals], dim=1)
    cat_i = torch.cat([best_i[row, n0:n1], ids], dim=1)
    top_v, pos = torch.topk(cat_v, k, dim=1)
    best_v[row, n0:n1] = top_v
    best_i[row, n0:n1] = torch.gather(cat_i, 1, pos)
