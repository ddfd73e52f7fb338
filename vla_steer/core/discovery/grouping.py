"""Automatic grouping: find a concept's neurons by meaning instead of by word list.

Each neuron is embedded as the rank-weighted mean of the (unit-normalised) input embeddings of its top
tokens (and, separately, of its bottom tokens, for sign -1). The neurons nearest the concept word's
embedding are kept as candidates, clustered with spherical k-means, and the cluster whose centroid is
nearest the concept word wins: it separates, say, {up, raise, high} neurons from {north, northern}
neurons that merely sit close to "up". Uses the model's own embedding matrix, so no extra model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.direction import Direction, DirectionNeuron
from vla_steer.core.discovery.lexicon import rank_weights
from vla_steer.core.discovery.projection import Projection
from vla_steer.core.tokens import normalize_token

_CHUNK = 1024  # neurons embedded at a time


def word_vector(backbone: Backbone, words: list[str], emb: torch.Tensor | None = None) -> torch.Tensor:
    """Mean unit embedding of the tokens of `words` (each tokenised as a word start)."""
    if backbone.tokenizer is None:
        raise ValueError("automatic grouping needs the backbone's tokenizer")
    emb = _embedding(backbone) if emb is None else emb
    ids = [i for w in words for i in backbone.tokenizer.encode(" " + w, add_special_tokens=False)]
    # Drop ids past the embedding and bare markers (SentencePiece may emit a lone "▁" before a word).
    pieces = backbone.tokenizer.convert_ids_to_tokens(ids)
    ids = [i for i, p in zip(ids, pieces, strict=True) if i < emb.shape[0] and normalize_token(p or "")]
    if not ids:
        raise ValueError(f"none of {words} tokenises to a known id")
    return F.normalize(emb[ids].mean(0), dim=0)


def _embedding(backbone: Backbone) -> torch.Tensor:
    e = backbone.input_embedding if backbone.input_embedding is not None else backbone.unembedding
    if e is None:
        raise ValueError(f"{backbone.name} has no token embedding to group by")
    return F.normalize(e.detach().float(), dim=1)


def neuron_vectors(emb: torch.Tensor, ids: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """[n, d_model] unit vectors: the rank-weighted meaning of each neuron's tokens `ids` [n, k]."""
    w = rank_weights(ids.shape[-1]) * (~special[ids]).float()  # special tokens carry no word meaning
    return F.normalize(torch.einsum("nk,nkd->nd", w, emb[ids]), dim=-1)


def spherical_kmeans(
    x: torch.Tensor, n_clusters: int, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [c, d], assignment [n]) for unit vectors `x`, by cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = min(n_clusters, x.shape[0])
    centroids = x[torch.randperm(x.shape[0], generator=g)[:n_clusters]].clone()
    assign = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = (x @ centroids.T).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(n_clusters):
            members = x[assign == c]
            if len(members):
                centroids[c] = F.normalize(members.mean(0), dim=0)
    return centroids, assign


def group_direction(
    backbone: Backbone,
    projection: Projection,
    name: str,
    words: list[str],
    *,
    concept: str | None = None,
    size: int = 16,
    layers: tuple[int, int] | None = None,
    candidates: int = 1024,
    n_clusters: int = 16,
    n_tokens: int = 10,
    seed: int = 0,
) -> Direction:
    """The `size` neurons of the embedding cluster nearest `words` (e.g. ["fast"]), best first."""
    emb = _embedding(backbone)
    target = word_vector(backbone, words, emb)
    labeler = backbone.labeler
    special = torch.zeros(emb.shape[0], dtype=torch.bool)
    if labeler is not None:
        special[: labeler.size] = torch.tensor([labeler.special(i) is not None for i in range(labeler.size)])[
            : emb.shape[0]
        ]
    # Keep a running set of the `candidates` neurons nearest the concept, one layer at a time, so
    # memory stays at one layer's d_mlp x d_model whatever the model.
    cand_sim = torch.empty(0)
    cand_vec = torch.empty(0, emb.shape[1])
    cand_key = torch.empty(0, 3, dtype=torch.long)  # (side, row, neuron); side 0 = top (+1), 1 = bottom (-1)
    for row, layer in enumerate(projection.layers):
        if layers is not None and not layers[0] <= layer <= layers[1]:
            continue
        for side, ids in enumerate((projection.top_ids[row], projection.bottom_ids[row])):
            # Chunks of neurons: the gathered embeddings are [chunk, k, d_model], not [d_mlp, k, d_model].
            v = torch.cat([neuron_vectors(emb, c, special) for c in ids.split(_CHUNK)])
            sim = v @ target
            keep = torch.topk(sim, min(candidates, sim.numel())).indices
            key = torch.stack([torch.full_like(keep, side), torch.full_like(keep, row), keep], dim=1)
            cand_sim, cand_vec, cand_key = (
                torch.cat([cand_sim, sim[keep]]),
                torch.cat([cand_vec, v[keep]]),
                torch.cat([cand_key, key]),
            )
            top = torch.topk(cand_sim, min(candidates, cand_sim.numel())).indices
            cand_sim, cand_vec, cand_key = cand_sim[top], cand_vec[top], cand_key[top]
    if cand_sim.numel() == 0:
        raise ValueError(f"no neurons in layers {layers} (projected layers: {projection.layers})")
    x, n_cand = cand_vec, cand_sim.numel()
    centroids, assign = spherical_kmeans(x, n_clusters, seed=seed)
    best = int((centroids @ target).argmax())
    members = (assign == best).nonzero().flatten()
    members = members[torch.argsort(x[members] @ target, descending=True, stable=True)]
    neurons, seen = [], set()
    for m in members.tolist():
        s, r, i = cand_key[m].tolist()
        if (r, i) in seen:  # a neuron can be a candidate by its top and by its bottom tokens
            continue
        if len(neurons) == size:
            break
        seen.add((r, i))
        ids = (projection.top_ids if s == 0 else projection.bottom_ids)[r, i, :n_tokens]
        tokens = [labeler.label(int(t)).strip() for t in ids] if labeler else [str(int(t)) for t in ids]
        score = round(float(x[m] @ target), 4)
        neurons.append(DirectionNeuron(projection.layers[r], i, 1.0 if s == 0 else -1.0, score, tokens))
    prov = {
        "method": "embedding-clusters",
        "words": list(words),
        "k": projection.k,
        "candidates": n_cand,
        "n_clusters": n_clusters,
        "cluster_size": int((assign == best).sum()),
        "layers": list(layers) if layers else None,
        "seed": seed,
    }
    return Direction(name, concept or name, neurons, prov)
