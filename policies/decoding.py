"""One cached decoding step on whichever key/value-cache argument the installed transformers takes.

transformers 5.x renamed `past_key_values=` to `cache=` (the old name is deprecated and goes in 5.40);
both OpenVLA-style policies decode their action tokens one cached forward at a time through this.
`stack_prompts` makes a batch of prompts of one length (the policies' `batch_key`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch


@cache
def _takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def next_token(lm: torch.nn.Module, token: torch.Tensor, previous: Any) -> Any:
    """The forward of `token` [B, k] (usually k = 1) after `previous` (the last output), reusing its
    key/value cache."""
    if _takes_cache(type(lm)):
        return lm(input_ids=token, cache=previous.cache, use_cache=True)
    return lm(input_ids=token, past_key_values=previous.past_key_values, use_cache=True)


def redo(lm: torch.nn.Module, tokens: torch.Tensor, previous: Any, keep: int) -> Any:
    """The forward of `tokens` [B, k] after only the first `keep` positions of `previous`'s cache (the rest
    are dropped): positions already decoded, computed again (the TinyVLA's plan, unsteered)."""
    cache = previous.cache if _takes_cache(type(lm)) else previous.past_key_values
    cache.crop(keep - cache.get_seq_length())  # negative: how many to drop (all transformers versions)
    return next_token(lm, tokens, previous)


def stack_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """[B, T] prompt ids for prompts of one length (the node batches by length: rows unpadded, so each
    computes what it computes alone)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"a batch takes prompts of one length, got lengths {[len(p) for p in prompts]}")
    return torch.tensor([list(p) for p in prompts], device=device)
