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

    words = ["quickly", "slowly", *extra_words]
    # the prompt's and the answer's own text: "Task: ..., State: 12 255 -1;" and "Action: "
    corpus = [f"Task: pick, State: {i} {255 - i} -1;" for i in range(256)] + ["Action: "] * 50
    trained = tiny.build_tokenizer(vocab_size=vocab_size - 8, extra_words=words, corpus=corpus)
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


def tiny_policy(*, seed: int = 0, vocab_size: int = 512, extra_words: tuple[str, ...] = (), **config):
    """A randomly initialised tiny pi0-FAST (tests, benchmarks): two 32 px cameras (`image`, `wrist_image`),
    8-d state, 7-d actions in chunks of 10, a FAST tokenizer fitted on smooth random chunks, MEAN_STD stats.
    `config`: FastConfig fields to override."""
    import numpy as np

    from policies.pi0.config import Feature, GemmaDims, VisionDims
    from policies.pi0_fast.config import FastArchitecture, FastConfig
    from policies.pi0_fast.fast import FastTokenizer, smooth_chunks
    from policies.pi0_fast.policy import PI0FastPolicy

    arch = FastArchitecture(
        paligemma=GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        vision=VisionDims(hidden=32, intermediate=64, depth=1, num_heads=2, patch=8, image_size=32),
        vocab_size=vocab_size,
    )
    images = [Feature(f"observation.images.{k}", "VISUAL", (3, 32, 32)) for k in ("image", "wrist_image")]
    cfg = FastConfig(
        arch, images=images, state=Feature("observation.state", "STATE", (8,)),
        action=Feature("action", "ACTION", (7,)),
        **({"chunk_size": 10, "n_action_steps": 10, "tokenizer_max_length": 48, "max_decoding_steps": 24,
            "validate_action_token_prefix": False} | config),
    )  # fmt: skip
    fast = FastTokenizer.fit(smooth_chunks(300, cfg.n_action_steps, 7, seed=seed), scale=10, vocab_size=128)
    rng = np.random.default_rng(seed)
    stats = {
        "observation.state": {"mean": rng.normal(size=8), "std": rng.uniform(0.5, 2.0, 8)},
        "action": {"mean": rng.normal(size=7) * 0.1, "std": rng.uniform(0.1, 0.5, 7)},
    }
    tok = paligemma_tokenizer(vocab_size, extra_words)
    policy = PI0FastPolicy.build(cfg, tok, fast, seed=seed, stats=stats)
    import torch

    gen = torch.Generator().manual_seed(seed)
    head = policy.model.paligemma.lm_head.weight
    with torch.no_grad():  # random tiny weights decode one token over and over: spread them
        for p in policy.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        for p in policy.model.language_model.layers.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        # a trained pi0-FAST writes FAST tokens: large random FAST rows put the argmax among them, varied
        first, last = policy.actions.first_id, policy.actions.last_id
        head[first : last + 1] = 0.5 * torch.randn(last + 1 - first, head.shape[1], generator=gen)
    return policy
