"""YAML config files validated by pydantic models, with errors that name the file, the key and the rule.

Torch-free: the LIBERO node reads its sim config from its own environment. The shipped configs are package
data (`vla_steer/configs/{concepts,policies,sims,robots}`), so an installed wheel finds them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("concepts", "policies", "sims", "robots")


def shipped(group: str) -> Path:
    """The directory of one group of shipped configs."""
    if group not in GROUPS:
        raise ValueError(f"unknown config group {group!r}; groups: {', '.join(GROUPS)}")
    return CONFIGS / group


def resolve_config(arg: str | Path, group: str) -> Path:
    """A config by path, or by the name of a shipped one ("robosuite_lift" -> .../configs/sims/robosuite_lift.yaml)."""
    path = Path(arg)
    if path.exists() or path.suffix:
        return path
    named = shipped(group) / f"{path}.yaml"
    if named.is_file():
        return named
    names = ", ".join(sorted(p.stem for p in shipped(group).glob("*.yaml")))
    raise FileNotFoundError(f"{arg}: no such file, and no shipped {group} config of that name ({names})")


def load_yaml_model(path: str | Path, model: type[Model], what: str = "config") -> Model:
    """`model` validated from the YAML file at `path` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return model.model_validate(raw if raw is not None else {})
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"{path}: {problems}") from None
