"""Merge a PEFT LoRA adapter into a model's weights, without depending on peft.

Discovery projects `down_proj.weight`; a fine-tune that ships as LoRA (OpenVLA's LIBERO fine-tunes were
trained that way) changes those weights only once merged: `W += scale * B @ A` with
`scale = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), per-module overrides from `rank_pattern` /
`alpha_pattern`. Reads the adapter format peft writes: `adapter_config.json` +
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Merge the adapter in place; returns the merged module names."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora) are not supported; merge with peft first")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise ValueError(f"{cfg_path}: missing 'r' or 'lora_alpha'")
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        m = _KEY.match(key)
        if m is None:
            # Full replacement weights (modules_to_save), embedding LoRA or LoRA biases change the model
            # too; merging only part of an adapter would project the wrong weights.
            raise ValueError(f"{weights_path}: cannot merge {key!r} (only lora_A/lora_B of Linear layers)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    modules = dict(model.named_modules())
    merged = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {name} has lora_{next(iter(ab))} but not its pair")
        target = _resolve(modules, name)
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"{weights_path}: {name} is {type(target).__name__}, only nn.Linear is supported"
            )
        r = _pattern(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        a, b = ab["A"].float(), ab["B"].float()
        if b.shape[0] != target.out_features or a.shape[1] != target.in_features or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: {name} lora shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                f"weight {tuple(target.weight.shape)}"
            )
        with torch.no_grad():
            delta = (b @ a) * scale
            target.weight.add_(delta.to(target.weight.device, target.weight.dtype))
        merged.append(name)
    if not merged:
        raise ValueError(f"{weights_path}: no lora_A/lora_B weights found")
    return merged


def _resolve(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The module an adapter key names, allowing the model to be wrapped in (or unwrap) a prefix."""
    if name in modules:
        return modules[name]
    parts = name.split(".")
    for i in range(1, len(parts)):
        suffix = ".".join(parts[i:])
        hits = [m for n, m in modules.items() if n == suffix or n.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
    raise ValueError(
        f"adapter module {name!r} matches no module of {type(next(iter(modules.values()))).__name__}"
    )


def _pattern(patterns: dict[str, int | float], name: str, default):
    for pat, value in patterns.items():
        if name == pat or name.endswith("." + pat) or re.fullmatch(pat, name):
            return value
    return default
