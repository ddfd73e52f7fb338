"""LeRobot's saved processor pipelines (`policy_preprocessor.json`, `policy_postprocessor.json`) of pi0,
pi0.5 and pi0-FAST checkpoints: what they say is honoured or refused, never ignored.

Honoured: the rename step's `rename_map` (dataset key -> checkpoint feature; real fine-tunes map e.g.
`observation.images.image` -> `observation.images.base_0_rgb`): an image feature renamed from a dataset
key reads the observation key of that name by default (`image_keys` still wins); the state's and action's
names do not matter here (they are positional). The tokenizer step's `tokenizer_name`: the tokenizer when
the checkpoint directory has none and no `tokenizer` option is given. Checked against config.json (a
disagreement is refused, naming the file and key): the normaliser steps' `eps` (LeRobot's 1e-8) and
`norm_map`, the tokenizer step's `max_length`, pi0-FAST's action tokenizer step's `action_tokenizer_name`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.pi0.inputs import default_image_key

FILES = ("policy_preprocessor.json", "policy_postprocessor.json")
LEROBOT_EPS = 1e-8  # what policies.pi0.checkpoint.normalizers uses for a LeRobot checkpoint


@dataclass
class Processors:
    image_keys: dict[str, str] = field(default_factory=dict)  # checkpoint feature -> observation key
    tokenizer_name: str | None = None


def read_processors(directory: Path, cfg: Any) -> Processors:
    """The settings of `directory`'s processor files (absent files: none); `cfg`: a PI0Config or FastConfig."""
    out = Processors()
    images = {f.name for f in cfg.images}
    others = {cfg.action.name} | ({cfg.state.name} if cfg.state is not None else set())
    for name in FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            steps = json.loads(path.read_text()).get("steps", [])
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path}: not a LeRobot processor file ({e})") from None
        for i, step in enumerate(steps):
            kind, conf = step.get("registry_name", ""), step.get("config") or {}
            where = f"{path}: steps[{i}] ({kind})"
            if kind == "rename_observations_processor":
                for old, new in (conf.get("rename_map") or {}).items():
                    if new in images:
                        out.image_keys[new] = default_image_key(old)
                    elif new not in others:
                        raise ValueError(
                            f"{where}: rename_map renames {old!r} to {new!r}, which is no feature of "
                            "config.json: this loader cannot honour it"
                        )
            elif kind in ("normalizer_processor", "unnormalizer_processor"):
                if "eps" in conf and float(conf["eps"]) != LEROBOT_EPS:
                    raise ValueError(f"{where}: eps {conf['eps']} is not LeRobot's {LEROBOT_EPS}, which this "
                                     "loader normalises with")  # fmt: skip
                for kind_, mode in (conf.get("norm_map") or {}).items():
                    if kind_ in ("STATE", "ACTION") and cfg.normalization.get(kind_, "IDENTITY") != mode:
                        raise ValueError(
                            f"{where}: norm_map.{kind_} is {mode!r} but config.json's normalization_mapping "
                            f"says {cfg.normalization.get(kind_, 'IDENTITY')!r}"
                        )
            elif kind == "tokenizer_processor":
                if "max_length" in conf and int(conf["max_length"]) != cfg.tokenizer_max_length:
                    raise ValueError(
                        f"{where}: max_length {conf['max_length']} but config.json's tokenizer_max_length "
                        f"is {cfg.tokenizer_max_length}"
                    )
                out.tokenizer_name = conf.get("tokenizer_name") or out.tokenizer_name
            elif kind == "action_tokenizer_processor":
                named, ours = conf.get("action_tokenizer_name"), getattr(cfg, "action_tokenizer_name", None)
                if named is not None and named != ours:
                    raise ValueError(
                        f"{where}: action_tokenizer_name {named!r} but config.json's is {ours!r}"
                    )
    return out
