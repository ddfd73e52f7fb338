"""Load a language backbone from a local checkpoint directory (or a hub id, where a hub is reachable).

Plain causal LMs (Llama, Gemma, ...) and PaliGemma load through transformers; a PEFT LoRA adapter in
the directory (or given explicitly) is merged before anything is projected. VLA policies (OpenVLA, pi0)
build their own Backbone through the policy interface.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vla_steer.core.backbone import Backbone
from vla_steer.core.lora import merge_lora
from vla_steer.core.tokens import ActionBins, TokenLabeler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    lora: str | Path | None = None,
    action_bins: int | None = None,
) -> Backbone:
    """The steerable backbone of the checkpoint at `path`.

    `action_bins`: the top N ids of the tokenizer vocabulary are OpenVLA-style action bins (default:
    the config's `n_action_bins`, if any).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_local(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "paligemma":
        from transformers import PaliGemmaForConditionalGeneration as cls
    else:
        cls = AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    if lora is None and (Path(path) / "adapter_config.json").exists():
        lora = path
    if lora is not None:
        merge_lora(model, lora)
    tokenizer = AutoTokenizer.from_pretrained(path)
    n_bins = action_bins if action_bins is not None else getattr(config, "n_action_bins", None)
    bins = ActionBins(vocab_size=len(tokenizer), n_bins=n_bins) if n_bins else None
    labeler = TokenLabeler.from_tokenizer(
        tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0], action_bins=bins
    )
    return Backbone.from_model(model, tokenizer, labeler=labeler, name=Path(str(path)).name or str(path))


def _check_local(path: str | Path) -> None:
    """A path that looks local must be a checkpoint directory; anything else is taken as a hub id."""
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith(".") or p.exists() or str(path).count("/") > 1
    if not looks_local:
        return
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    if (p / "policy_config.json").exists():
        raise ValueError(f"{p} is a demo VLA checkpoint: load it with policies.load_policy (`.backbone`)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json: not a transformers checkpoint directory")
    head = (p / "config.json").read_text()[:100_000]
    if '"openvla"' in head or '"prismatic"' in head or '"action_horizon"' in head or '"type": "pi0' in head:
        raise ValueError(
            f"{p} is a VLA policy checkpoint (OpenVLA or pi0): load it with "
            "policies.load_policy(policies.resolve.resolve_policy(path)).backbones, or `vla-steer discover`"
        )
