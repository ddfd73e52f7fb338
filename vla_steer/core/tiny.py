"""Small transformers models with a real tokenizer, built on the spot (tests, benchmarks, the demo).

The tokenizer is a SentencePiece-style BPE (word starts marked with "▁", like Llama's and Gemma's)
trained on robot-instruction text, so lexicon matching meets the same subword shapes as on a real
checkpoint. With `action_bins`, 256 tokens are appended at the top of the vocabulary and
`config.n_action_bins` is set, the OpenVLA layout (the top ids of the tokenizer vocabulary are bins).
Models go through `save_pretrained` / the real loader, never used straight from memory in tests.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

_VERBS = [
    "pick up",
    "lift",
    "move",
    "place",
    "put",
    "push",
    "grasp",
    "stack",
    "open",
    "close",
    "carry",
    "slide",
]
_OBJECTS = [
    "the red block",
    "the cube",
    "the bowl",
    "the mug",
    "the drawer",
    "the plate",
    "the can",
    "the cup",
]
_PLACES = ["on the table", "in the basket", "to the left", "to the right", "onto the shelf", "near the robot"]
_MANNERS = [
    "quickly", "slowly", "fast", "carefully", "gently", "high", "low", "up", "down", "steadily", "rapidly",
    "roughly", "precisely", "higher", "lower", "above the bowl", "below the shelf", "with care",
]  # fmt: skip
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def instruction_corpus(extra_words: Iterable[str] = (), seed: int = 0) -> list[str]:
    """Robot instructions from templates, plus every extra word on its own line so it becomes a token."""
    rng = random.Random(seed)
    lines = [
        f"{v} {o} {p} {m}"
        for v, o, p, m in itertools.product(_VERBS, _OBJECTS, _PLACES, _MANNERS)
        if rng.random() < 0.25
    ]
    lines += [f"move {w} please" for w in extra_words for _ in range(20)]
    rng.shuffle(lines)
    return lines


def build_tokenizer(
    vocab_size: int = 768,
    extra_words: Iterable[str] = (),
    action_bins: int = 0,
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A trained Metaspace BPE tokenizer; with `action_bins`, that many bin tokens end the vocabulary.
    `corpus` adds text of its own to the robot-instruction templates it is trained on."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(instruction_corpus(extra_words) + list(corpus or ()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if action_bins:
        # Ordinary (non-special) tokens so they decode like OpenVLA's reused vocabulary slots.
        fast.add_tokens([f"<bin{i:03d}>" for i in range(action_bins)])
    return fast


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def build_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 64,
    layers: int = 4,
    intermediate: int = 256,
    heads: int = 4,
    action_bins: int = 0,
    seed: int = 0,
    tie_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A random Llama whose embedding is padded to a multiple of 64, as OpenVLA's is (32000 -> 32064)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    if action_bins:
        cfg.n_action_bins = action_bins
    return LlamaForCausalLM(cfg).eval()


def build_gemma(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 64,
    layers: int = 3,
    intermediate: int = 256,
    seed: int = 0,
) -> GemmaForCausalLM:
    """A random Gemma (tied embedding, (1 + g) final norm, gelu-tanh gated MLP)."""
    torch.manual_seed(seed)
    cfg = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # a non-trivial final-norm gain, so folding it in is actually tested
        model.model.norm.weight.normal_(0.0, 0.5)
    return model


def save(model, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
