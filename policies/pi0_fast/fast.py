"""The FAST action tokenizer (Pertsch et al. 2025): action chunk <-> BPE token ids, no remote code.

Encoding (the reference processor's `__call__`): a normalised chunk [H, D] -> DCT-II along time per action
dimension (`norm="ortho"`) -> times `scale`, rounded -> minus `min_token`, floored at 0 -> one character per
coefficient (`chr`), time-major over the flattened [H, D] -> BPE ids (a HF `tokenizers` byte-level BPE).
Decoding inverts each step; LeRobot's pi0_fast decodes "relaxed": the coefficient string is cut or
zero-padded to H*D, and a sequence that still does not decode (an id the BPE cannot take, a wrong length)
becomes an all-zero coefficient block, so a zero action chunk (after un-normalisation: the stats' centre).

A processor directory holds `tokenizer.json` (+ `tokenizer_config.json`) and `processor_config.json`
(`scale`, `vocab_size`, `min_token`, `action_dim`, `time_horizon`); its `processor_class` / `auto_map`
(code to run) are never used. `fit` trains a new one as the reference's `fit` does (tests, benchmarks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
PROCESSOR_CONFIG = "processor_config.json"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", PROCESSOR_CONFIG)


@dataclass
class FastTokenizer:
    bpe: Any  # transformers.PreTrainedTokenizerFast over the coefficient characters
    scale: float = 10.0
    vocab_size: int = 1024
    min_token: int = 0
    action_dim: int | None = None
    time_horizon: int | None = None

    @property
    def n_tokens(self) -> int:
        """How many BPE ids exist (what the policy maps into the language model's vocabulary)."""
        return len(self.bpe)

    # -- encode / decode ---------------------------------------------------------------------------

    def encode(self, chunk: np.ndarray) -> list[int]:
        """A normalised action chunk [H, D] -> FAST token ids."""
        from scipy.fft import dct

        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"an action chunk must be [time, action_dim], got shape {list(chunk.shape)}")
        coeff = np.around(dct(chunk, axis=0, norm="ortho") * self.scale)
        text = "".join(map(chr, np.maximum(coeff.flatten() - self.min_token, 0).astype(int)))
        return list(self.bpe(text)["input_ids"])

    def coefficients(self, ids: Sequence[int], time_horizon: int, action_dim: int) -> np.ndarray | None:
        """The quantised DCT block [H, D] that `ids` spell (cut or zero-padded to H*D, LeRobot's relaxed
        decoding); None if the ids do not decode."""
        try:
            text = self.bpe.decode([int(i) for i in ids])
            coeff = np.array(list(map(ord, text))) + self.min_token
        except Exception as e:  # noqa: BLE001 - the reference turns any decoding error into zeros
            log.warning("FAST tokens do not decode (%s: %s): zero actions", type(e).__name__, e)
            return None
        n = time_horizon * action_dim
        coeff = coeff[:n] if coeff.shape[0] >= n else np.pad(coeff, (0, n - coeff.shape[0]))
        return coeff.reshape(time_horizon, action_dim)

    def decode(self, ids: Sequence[int], time_horizon: int, action_dim: int) -> np.ndarray:
        """FAST token ids -> normalised action chunk [H, D] (zeros where the ids do not decode)."""
        from scipy.fft import idct

        coeff = self.coefficients(ids, time_horizon, action_dim)
        if coeff is None:
            coeff = np.zeros((time_horizon, action_dim))
        return idct(coeff / self.scale, axis=0, norm="ortho")

    # -- persistence -------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> FastTokenizer:
        """A processor directory (see the module doc); errors name the file and key."""
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        config_path = directory / PROCESSOR_CONFIG
        for need in ("tokenizer.json", PROCESSOR_CONFIG):
            if not (directory / need).is_file():
                raise FileNotFoundError(f"{directory}: no {need}: not a FAST action tokenizer directory")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        values = {}
        for key, kind in (("scale", float), ("vocab_size", int), ("min_token", int)):
            if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
                raise ValueError(f"{config_path}: {key} must be a number, got {config.get(key)!r}")
            values[key] = kind(config[key])
        if values["scale"] <= 0:
            raise ValueError(f"{config_path}: scale must be > 0, got {values['scale']}")
        for key in ("action_dim", "time_horizon"):
            value = config.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{config_path}: {key} must be a positive integer or null, got {value!r}")
            values[key] = value
        bpe = PreTrainedTokenizerFast.from_pretrained(str(directory))
        return cls(bpe, **values)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.bpe.save_pretrained(str(directory))
        config = {
            "scale": self.scale, "vocab_size": self.vocab_size, "min_token": self.min_token,
            "action_dim": self.action_dim, "time_horizon": self.time_horizon,
        }  # fmt: skip
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def fit(
        cls,
        chunks: Sequence[np.ndarray],
        *,
        scale: float = 10.0,
        vocab_size: int = 1024,
        time_horizon: int | None = None,
        action_dim: int | None = None,
    ) -> FastTokenizer:
        """Train a FAST tokenizer on normalised action chunks [H, D], as the reference's `fit` does: the
        quantised coefficients' range is the initial alphabet, BPE merges up to `vocab_size`."""
        from scipy.fft import dct
        from tokenizers import ByteLevelBPETokenizer
        from tokenizers.trainers import BpeTrainer
        from transformers import PreTrainedTokenizerFast

        quantised = [np.around(dct(np.asarray(c, np.float64), axis=0, norm="ortho").flatten() * scale)
                     for c in chunks]  # fmt: skip
        every = np.concatenate(quantised)
        low, high = int(every.min()), int(every.max())
        if high - low > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the coefficient range {high - low}")
        bpe = ByteLevelBPETokenizer()
        trainer = BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
            initial_alphabet=[chr(i) for i in range(high - low + 1)], max_token_length=10000,
        )  # fmt: skip
        texts = ("".join(map(chr, (q - low).astype(int))) for q in quantised)
        bpe._tokenizer.train_from_iterator(texts, trainer=trainer)  # noqa: SLF001 - custom alphabet
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
        return cls(fast, scale=scale, vocab_size=vocab_size, min_token=low, time_horizon=time_horizon,
                   action_dim=action_dim)  # fmt: skip


def smooth_chunks(n: int, horizon: int, action_dim: int, seed: int = 0) -> list[np.ndarray]:
    """Random smooth normalised action chunks in about [-1, 1] (sums of a few low-frequency sines): what a
    tiny FAST tokenizer is fitted on in tests and benchmarks."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, horizon)[:, None]
    out = []
    for _ in range(n):
        amp = rng.uniform(-0.5, 0.5, (3, action_dim))
        freq = rng.uniform(0.2, 2.0, (3, action_dim))
        phase = rng.uniform(0, 2 * np.pi, (3, action_dim))
        out.append(sum(amp[k] * np.sin(2 * np.pi * freq[k] * t + phase[k]) for k in range(3)))
    return out
