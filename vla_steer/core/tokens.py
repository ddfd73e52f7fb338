"""Readable labels for vocabulary tokens, including the special ranges VLAs reuse.

OpenVLA reinterprets the last 256 ids of Llama's 32000-token vocabulary as action bins
(bin = vocab - id - 1, clipped to [0, n_bins - 2], value = that bin's centre on [-1, 1]); pi0-FAST
maps its FAST (BPE over DCT coefficients) ids down from the top of PaliGemma's vocabulary, skipping
the last 128 (id = vocab - 1 - skip - fast id); PaliGemma has 1024 `<locNNNN>` and 128 `<segNNN>`
tokens. Labels show these as what they mean, and lexicon matching skips them (an action token is not
the word it happens to be spelled as), so discovery tells word neurons from action neurons.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

# Word-start markers of SentencePiece ("▁") and byte-level BPE ("Ġ"), and the GPT-2 newline marker.
_MARKERS = ("▁", "Ġ", "Ċ")
_LOC_SEG = re.compile(r"^<(loc|seg)(\d+)>$")


def normalize_token(piece: str) -> str:
    """The bare lowercase word a token spells: markers, case, accents and punctuation removed."""
    for m in _MARKERS:
        piece = piece.replace(m, " ")
    piece = unicodedata.normalize("NFKC", piece).strip().lower()
    return re.sub(r"[^\w]+", "", piece)


def is_word_start(piece: str) -> bool:
    """True if a token begins a word (SentencePiece / byte-BPE marker, or a leading space)."""
    return piece.startswith(_MARKERS) or piece.startswith(" ")


@dataclass(frozen=True)
class ActionBins:
    """OpenVLA's action tokenizer: the top `n_bins` ids of the tokenizer vocabulary are action bins."""

    vocab_size: int = 32000  # the tokenizer's vocabulary, not the padded embedding
    n_bins: int = 256
    low: float = -1.0
    high: float = 1.0

    @property
    def first_id(self) -> int:
        return self.vocab_size - self.n_bins

    def contains(self, token_id: int) -> bool:
        return self.first_id <= token_id < self.vocab_size

    def value(self, token_id: int | np.ndarray) -> float | np.ndarray:
        """Centre of the bin a token id stands for (exact inverse of OpenVLA's discretisation)."""
        edges = np.linspace(self.low, self.high, self.n_bins)
        centres = (edges[:-1] + edges[1:]) / 2.0
        idx = np.clip(self.vocab_size - np.asarray(token_id) - 1, 0, centres.shape[0] - 1)
        out = centres[idx]
        return float(out) if np.ndim(out) == 0 else out

    def label(self, token_id: int) -> str:
        return f"[action {self.value(token_id):+.3f}]"

    def paper_label(self, token_id: int) -> str:
        return f"[action: {self.value(token_id):.3f}]"

    def token(self, value: float | np.ndarray) -> int | np.ndarray:
        """Token id of the bin a value falls in (OpenVLA's `np.digitize` over 256 edges on [low, high])."""
        edges = np.linspace(self.low, self.high, self.n_bins)
        idx = np.clip(np.digitize(np.clip(value, self.low, self.high), edges), 1, self.n_bins - 1)
        out = self.vocab_size - idx
        return int(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class FastActionTokens:
    """pi0-FAST's action tokens: FAST id k is vocabulary id `vocab_size - 1 - skip - k`, k < n_tokens
    (`vocab_size`: the PaliGemma tokenizer's base vocabulary, as LeRobot and openpi map them)."""

    vocab_size: int
    n_tokens: int
    skip: int = 128

    @property
    def last_id(self) -> int:
        return self.vocab_size - 1 - self.skip

    @property
    def first_id(self) -> int:
        return self.last_id - self.n_tokens + 1

    def contains(self, token_id: int) -> bool:
        return self.first_id <= token_id <= self.last_id

    def fast_id(self, token_id: int | np.ndarray) -> int | np.ndarray:
        return self.last_id - token_id

    def label(self, token_id: int) -> str:
        return f"[FAST {self.fast_id(token_id)}]"

    paper_label = label


class TokenLabeler:
    """Maps token ids to (display label, normalised word or None for special tokens)."""

    def __init__(
        self,
        pieces: list[str],
        action_bins: ActionBins | FastActionTokens | None = None,
        padded_to: int | None = None,
    ):
        self.pieces = pieces
        self.action_bins = action_bins
        self.size = max(len(pieces), padded_to or 0)
        self._words: list[str | None] | None = None

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: int | None = None,
        action_bins: ActionBins | FastActionTokens | None = None,
    ) -> TokenLabeler:
        n = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        pieces = [p if p is not None else "" for p in pieces]
        return cls(pieces, action_bins=action_bins, padded_to=vocab_size)

    def special(self, token_id: int) -> str | None:
        """A label for a special-range token, or None for an ordinary one."""
        if token_id >= len(self.pieces):
            return "[padding]"  # embedding rows past the tokenizer (OpenVLA pads 32000 -> 32064)
        if self.action_bins is not None and self.action_bins.contains(token_id):
            return self.action_bins.label(token_id)
        m = _LOC_SEG.match(self.pieces[token_id])
        if m:
            return f"[{m.group(1)} {int(m.group(2))}]"
        return None

    def label(self, token_id: int) -> str:
        """What a person should read for this token."""
        special = self.special(token_id)
        if special is not None:
            return special
        piece = self.pieces[token_id]
        for m in _MARKERS:
            piece = piece.replace(m, " ")
        return piece if piece.strip() else repr(piece)

    def word(self, token_id: int) -> str | None:
        """The normalised word for lexicon matching; None for special tokens and non-words."""
        if self.special(token_id) is not None:
            return None
        w = normalize_token(self.pieces[token_id])
        return w or None

    def word_start(self, token_id: int) -> bool:
        return token_id < len(self.pieces) and is_word_start(self.pieces[token_id])

    def words(self) -> list[str | None]:
        if self._words is None:
            self._words = [self.word(i) for i in range(self.size)]
        return self._words

    @property
    def has_markers(self) -> bool:
        """Whether the vocabulary marks word starts (SentencePiece / byte-BPE) at all."""
        return any(is_word_start(p) for p in self.pieces)

    def to_paper_label(self, token_id: int) -> str:
        """The paper repo's spelling: '[action: -0.227]' for bins, the bare piece otherwise."""
        if self.action_bins is not None and self.action_bins.contains(token_id):
            return self.action_bins.paper_label(token_id)
        return self.label(token_id).strip()
