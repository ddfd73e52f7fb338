"""YAML config files validated by pydantic models, with errors that name the file, the key and the rule.

A key given twice in one mapping is an error, not "the last one wins": a second `max_linear_speed` line
must not silently replace the first.

Torch-free: the LIBERO node reads its sim config from its own environment. The shipped configs are package
data (`vla_steer/configs/{concepts,policies,sims,robots,profiles}`), so an installed wheel finds them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("concepts", "policies", "sims", "robots", "profiles")


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


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, line: int, first: int):
        super().__init__(f"key {key!r} appears twice (lines {first} and {line})")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base class says so
                pass
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> object:
    """A YAML document (yaml.safe_load's types); a repeated key raises `DuplicateKeyError`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> object:
    """The YAML document in `path` (yaml.safe_load's types); a repeated key raises `DuplicateKeyError`."""
    return parse_yaml(Path(path).read_text(encoding="utf-8"))


def load_yaml_model(path: str | Path, model: type[Model], what: str = "config") -> Model:
    """`model` validated from the YAML file at `path` (an empty file is an empty mapping)."""
    return validate_model(read_yaml_file(path, what), model, str(path))


def read_yaml_file(path: str | Path, what: str = "config") -> object:
    """The YAML document in `path` (an empty file is an empty mapping); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        raw = load_yaml(path)
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: {e} (a second line would silently replace the first)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return raw if raw is not None else {}


def validate_model(raw: object, model: type[Model], source: str) -> Model:
    """`model` validated from parsed YAML; a ValueError names `source`, each key and its rule."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"{source}: {problems}") from None
