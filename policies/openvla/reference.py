"""Deterministic weights for the reference comparison with the official implementation (torch only).

`scripts/openvla_reference_keys.py` runs the official OpenVLA code in a separate environment and fills a
tiny model with `reference_weights`; the test fills ours with the same call and compares what both compute.
This module imports nothing but torch and zlib, so that script can load it by file path.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import torch

ACTION_ROWS = slice(31744, 32000)  # Llama-2's ids reused as action bins
ACTION_ROW_GAIN = 3.0  # so the random model's greedy tokens land on action bins, as a trained one's do


def _is_norm_gain(name: str, shape: Sequence[int]) -> bool:
    parts = name.split(".")
    return len(shape) == 1 and parts[-1] == "weight" and "norm" in parts[-2]


def reference_weights(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One seeded tensor per name (independent of order and of how the model was built), float32."""
    out = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        x = torch.randn(*shape, generator=g)
        if name.endswith("scale_factor"):
            x = 0.1 + 0.01 * x
        elif _is_norm_gain(name, shape):
            x = 1.0 + 0.1 * x
        elif name.endswith("bias") or len(shape) < 2:
            x = 0.02 * x
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        out[name] = x
    head = out.get("language_model.lm_head.weight")
    if head is not None and head.shape[0] >= ACTION_ROWS.stop:
        head[ACTION_ROWS] *= ACTION_ROW_GAIN
    return out
