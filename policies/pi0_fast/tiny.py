"""Tiny tokenizers for pi0-FAST tests, benchmarks and the reference generator (which imports this file by
path: it needs neither torch's project build nor the wire).

pi0-FAST reads three things off PaliGemma's tokenizer that a plain tiny BPE lacks: `vocab_size` (the base
vocabulary, which FAST ids are mapped into from the top, 128 below its end) as large as the model's
vocabulary, the end-of-action marker "|" as a token of its own, and BOS prepended to every prompt.
"""

from __future__ import annotations

import json


def paligemma_tokenizer(vocab_size: int = 512, extra_words: tuple[str, ...] = ()):
    """A tiny tokenizer in PaliGemma's role: `vocab_size` pieces in all, the base vocabulary padded with
    `<unusedN>` pieces to `vocab_size - 2`, then "\\n" and "|" (so `len(tok) == vocab_size`, as PaliGemma's)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from vla_steer.core import tiny

    words = ["quickly", "slowly", "Action", "Task", "State", *extra_words]
    trained = tiny.build_tokenizer(vocab_size=vocab_size - 8, extra_words=words)
    data = json.loads(trained._tokenizer.to_str())  # noqa: SLF001
    vocab = data["model"]["vocab"]
    for i in range(vocab_size - 2 - len(vocab)):
        vocab[f"<unused{i}>"] = len(vocab)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )  # fmt: skip
    tok.add_tokens(["\n", "|"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # noqa: SLF001
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    if tok.vocab_size != vocab_size - 2 or len(tok) != vocab_size:
        raise AssertionError(f"tiny PaliGemma tokenizer: vocab_size {tok.vocab_size}, {len(tok)} pieces")
    return tok
