"""Shared fixtures: tiny models built from configs, saved to disk and loaded back like real checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from vla_steer.core import tiny  # noqa: E402
from vla_steer.core.config import shipped  # noqa: E402
from vla_steer.core.discovery import load_lexicons  # noqa: E402
from vla_steer.core.loading import load_backbone  # noqa: E402


@pytest.fixture(scope="session")
def poles():
    return load_lexicons(shipped("concepts"))


@pytest.fixture(scope="session")
def tokenizer(poles):
    words = sorted({w for p in poles.values() for w in p.words})
    return tiny.build_tokenizer(vocab_size=1024, extra_words=words, action_bins=256)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    model = tiny.build_llama(
        tokenizer, hidden=48, layers=4, intermediate=96, heads=4, action_bins=256, seed=1
    )
    return tiny.save(model, tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory, tokenizer):
    model = tiny.build_gemma(tokenizer, hidden=48, layers=3, intermediate=96, seed=2)
    return tiny.save(model, tokenizer, tmp_path_factory.mktemp("gemma"))


@pytest.fixture
def llama(llama_dir):
    """A fresh backbone per test (tests modify weights and hooks)."""
    torch.manual_seed(0)
    return load_backbone(llama_dir)


@pytest.fixture
def gemma(gemma_dir):
    return load_backbone(gemma_dir)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, poles):
    """A TinyVLA saved in its checkpoint layout with a policy config, and directions discovered on it."""
    from policies import load_policy
    from policies.tiny_vla import TinyVLA
    from vla_steer.core.discovery import discover

    root = tmp_path_factory.mktemp("tiny_vla")
    words = sorted({w for p in poles.values() for w in p.words})
    TinyVLA.build(words=words, seed=3).save(root / "policy")
    (root / "policy.yaml").write_text("kind: tiny_vla\npath: policy\ndevice: cpu\n")
    policy = load_policy(root / "policy.yaml")
    for d in discover(policy.backbone, poles, size=8, progress=False, device="cpu").values():
        d.save(root / "directions")
    return root
