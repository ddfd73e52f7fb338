"""A tiny pi0 (and pi0.5) configuration and inputs shared by the pi0 and pi0.5 policy tests and the
contrast-discovery tests."""

from __future__ import annotations

import numpy as np
import torch

from policies.pi0.config import Feature, GemmaDims, PI0Architecture, PI0Config, VisionDims
from vla_steer.wire import Observation

CHUNK, MAX_STATE, MAX_ACTION = 6, 12, 10


def tiny_config(**kw) -> PI0Config:
    arch = PI0Architecture(
        paligemma=GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        expert=GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        vision=VisionDims(hidden=32, intermediate=64, depth=1, num_heads=2, patch=8, image_size=32),
        vocab_size=kw.pop("vocab_size"),
        max_state_dim=MAX_STATE,
        max_action_dim=MAX_ACTION,
    )
    images = [
        Feature("observation.images.image", "VISUAL", (3, 32, 32)),
        Feature("observation.images.wrist_image", "VISUAL", (3, 32, 32)),
    ]
    return PI0Config(
        arch,
        images=images,
        state=Feature("observation.state", "STATE", (8,)),
        action=Feature("action", "ACTION", (7,)),
        chunk_size=CHUNK,
        n_action_steps=4,
        num_inference_steps=3,
        **kw,
    )


def tiny_stats(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation.state": {"mean": rng.normal(size=8), "std": rng.uniform(0.5, 2.0, 8)},
        "action": {"mean": rng.normal(size=7), "std": rng.uniform(0.5, 2.0, 7)},
    }


def make_obs(seed: int = 0, instruction: str = "pick up the red block") -> Observation:
    rng = np.random.default_rng(seed)
    images = {k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in ("image", "wrist_image")}
    return Observation(instruction, images, rng.normal(size=8).astype(np.float32))


def noise_of(seed: int) -> torch.Tensor:
    return torch.randn(CHUNK, MAX_ACTION, generator=torch.Generator().manual_seed(seed))


# -- pi0.5: the same sizes; its prompt holds the state as bin numbers, its default normalisation is quantiles

# so the tiny tokenizer learns the bin numbers and the prompt's frame (as scripts/lerobot_pi05_reference.py's)
STATE_CORPUS = [" ".join(str(i) for i in range(-1, 256)), "Task: the cube, State: 1 2 3;\nAction: "]
QUANTILES = {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}


def tiny_pi05_config(**kw) -> PI0Config:
    return tiny_config(variant="pi05", normalization=dict(QUANTILES), tokenizer_max_length=200, **kw)


def tiny_pi05_stats(seed: int = 0) -> dict:
    """tiny_stats plus the q01/q99 quantiles pi0.5 normalises with."""
    stats, rng = tiny_stats(seed), np.random.default_rng(seed + 100)
    for feature in stats.values():
        n = feature["mean"].size
        feature["q01"] = rng.normal(size=n) - 1.5
        feature["q99"] = feature["q01"] + rng.uniform(1.0, 4.0, n)
    return stats
