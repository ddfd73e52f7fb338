"""Concept lexicons and the scoring of neurons against them.

A lexicon file (`vla_steer/configs/concepts/*.yaml`) names a concept axis and its poles with their words:

    concept: speed
    poles:
      fast: {words: [fast, quickly, ...]}
      slow: {words: [slow, slowly, ...]}

A neuron's score for a pole sums, over its top-k tokens, a rank weight times how well the token matches
the pole's words (exact word 1.0, inflection 0.75, word-start piece of a word 0.5, a continuation piece
spelling a word 0.5), plus half the same sum for the opposite pole over its bottom-k tokens. Because a
gated MLP's coefficient can be negative, the mirror score (pole in the bottom tokens, opposite pole in
the top ones) is computed too: if it wins, the neuron expresses the pole with sign -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vla_steer.core.config import load_yaml_model
from vla_steer.core.discovery.direction import Direction, DirectionNeuron
from vla_steer.core.discovery.projection import Projection
from vla_steer.core.tokens import TokenLabeler, normalize_token

OPPOSITE_WEIGHT = 0.5
_INFLECTIONS = ("s", "es", "ed", "er", "est", "ing", "ly", "ily")


class _Pole(BaseModel):
    model_config = ConfigDict(extra="forbid")
    words: list[str] = Field(min_length=1)

    @field_validator("words")
    @classmethod
    def _normalise(cls, words: list[str]) -> list[str]:
        out = [normalize_token(w) for w in words]
        empty = [w for w, n in zip(words, out, strict=True) if not n]
        if empty:
            raise ValueError(f"words {empty} are empty after normalisation")
        return out


class _LexiconFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concept: str
    description: str = ""
    poles: dict[str, _Pole] = Field(min_length=1, max_length=2)


@dataclass(frozen=True)
class Pole:
    """One end of a concept axis: what a knob steers toward ("fast" on the "speed" axis)."""

    name: str
    concept: str
    words: frozenset[str]
    opposite: Pole | None = None

    def with_opposite(self, other: Pole) -> Pole:
        return Pole(self.name, self.concept, self.words, Pole(other.name, other.concept, other.words))


def load_lexicon(path: str | Path) -> dict[str, Pole]:
    """The poles of one lexicon file, each knowing its opposite. Errors name the file and key."""
    lex = load_yaml_model(path, _LexiconFile, "lexicon")
    poles = {name: Pole(name, lex.concept, frozenset(p.words)) for name, p in lex.poles.items()}
    if len(poles) == 2:
        a, b = poles.values()
        poles = {a.name: a.with_opposite(b), b.name: b.with_opposite(a)}
    return poles


def load_lexicons(directory: str | Path) -> dict[str, Pole]:
    """Every pole of every `*.yaml` lexicon in a directory, by pole name (names must be unique)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no concept lexicons (*.yaml) in {directory}")
    poles: dict[str, Pole] = {}
    for path in files:
        for name, pole in load_lexicon(path).items():
            if name in poles:
                raise ValueError(
                    f"{path}: pole {name!r} is already defined by concept {poles[name].concept!r}"
                )
            poles[name] = pole
    return poles


def token_match_weights(labeler: TokenLabeler, words: frozenset[str]) -> torch.Tensor:
    """[vocab] how well each token spells one of `words` (0 for special tokens and non-matches)."""
    inflected = {w + suf for w in words for suf in _INFLECTIONS} - words
    pieces = {w[:i] for w in words for i in range((len(w) + 1) // 2, len(w)) if i >= 3} - words - inflected
    # Without word-start markers (word-level vocabularies) every token is a whole word.
    markers = labeler.has_markers
    weights = torch.zeros(labeler.size)
    for tid, w in enumerate(labeler.words()):
        if w is None:
            continue
        start = labeler.word_start(tid) or not markers
        if w in words:
            weights[tid] = 1.0 if start else 0.5
        elif start and w in inflected:
            weights[tid] = 0.75
        elif start and w in pieces:
            weights[tid] = 0.5
    return weights


def rank_weights(k: int) -> torch.Tensor:
    """Linear decay: the top-ranked token counts k times as much as the k-th."""
    return torch.arange(k, 0, -1, dtype=torch.float32) / k


def score_pole(
    projection: Projection, labeler: TokenLabeler, pole: Pole
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, sign), each [n_layers, d_mlp]: how strongly each neuron expresses `pole`, and with which sign."""
    r = rank_weights(projection.k)
    match = token_match_weights(labeler, pole.words)
    top = (match[projection.top_ids] * r).sum(-1)
    bottom = (match[projection.bottom_ids] * r).sum(-1)
    if pole.opposite is not None:
        opp = token_match_weights(labeler, pole.opposite.words)
        pos = top + OPPOSITE_WEIGHT * (opp[projection.bottom_ids] * r).sum(-1)
        neg = bottom + OPPOSITE_WEIGHT * (opp[projection.top_ids] * r).sum(-1)
    else:
        pos, neg = top, bottom
    sign = torch.where(neg > pos, -1.0, 1.0)
    return torch.maximum(pos, neg), sign


def select_direction(
    projection: Projection,
    labeler: TokenLabeler,
    pole: Pole,
    *,
    size: int = 16,
    layers: tuple[int, int] | None = None,
    min_score: float = 0.5,
    n_tokens: int = 10,
    provenance: dict | None = None,
) -> Direction:
    """The `size` best-scoring neurons for `pole` within `layers` (inclusive range), best first.

    A neuron that expresses the opposite pole more strongly is never chosen. Fewer than `size`
    neurons come back when fewer clear `min_score`.
    """
    if size < 1 or not min_score > 0:
        raise ValueError(f"size must be >= 1 and min_score > 0, got size={size}, min_score={min_score}")
    score, sign = score_pole(projection, labeler, pole)
    if pole.opposite is not None:
        opp_score, _ = score_pole(projection, labeler, pole.opposite.with_opposite(pole))
        score = torch.where(opp_score > score, torch.full_like(score, -1.0), score)
    allowed = torch.tensor([layers is None or layers[0] <= layer <= layers[1] for layer in projection.layers])
    score = torch.where(allowed[:, None], score, torch.full_like(score, -1.0))  # never selected
    flat = score.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:size]
    neurons = []
    for f in order.tolist():
        if flat[f] < min_score:
            break
        row, idx = divmod(f, projection.d_mlp)
        s = float(sign[row, idx])
        ids = (projection.top_ids if s > 0 else projection.bottom_ids)[row, idx, :n_tokens]
        tokens = [labeler.label(int(t)).strip() for t in ids]
        neurons.append(DirectionNeuron(projection.layers[row], idx, s, round(float(flat[f]), 4), tokens))
    prov = {
        "method": "lexicon",
        "words": sorted(pole.words),
        "opposite": pole.opposite.name if pole.opposite else None,
        "k": projection.k,
        "rank_by": projection.rank_by,
        "layers": list(layers) if layers else None,
        "min_score": min_score,
    } | (provenance or {})
    return Direction(pole.name, pole.concept, neurons, prov)
