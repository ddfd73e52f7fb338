"""A steering direction: a named concept pole and the neurons that express it.

Saved as `<name>.json` (format version, concept, polarity, neurons with their top tokens, provenance
including the model fingerprint). The paper repo's dictionary YAML
(`{dict_name: {layer * d_mlp + neuron: [tokens]}}`) is imported and exported for comparison.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from vla_steer.core.config import parse_yaml
from vla_steer.core.steering import Neuron

FORMAT_VERSION = 1


@dataclass
class DirectionNeuron:
    layer: int
    index: int
    sign: float = 1.0  # +1: the concept is in the neuron's top tokens; -1: in its bottom tokens
    score: float = 0.0
    tokens: list[str] = field(default_factory=list)


@dataclass
class Direction:
    """`name` is what the knob is called ("fast"); `concept` the axis it belongs to ("speed")."""

    name: str
    concept: str
    neurons: list[DirectionNeuron]
    provenance: dict = field(default_factory=dict)

    def steer_neurons(self) -> list[Neuron]:
        return [Neuron(n.layer, n.index, n.sign) for n in self.neurons]

    @property
    def layers(self) -> list[int]:
        return sorted({n.layer for n in self.neurons})

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": "vla-steer/direction",
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "concept": self.concept,
            "neurons": [asdict(n) for n in self.neurons],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> Direction:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {data.get('format_version')!r} unsupported (expected {FORMAT_VERSION})"
            )
        missing = [k for k in ("name", "concept", "neurons") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        if not isinstance(data["neurons"], list):
            raise ValueError(f"{source}: 'neurons' must be a list")
        neurons = [_neuron_from_dict(n, f"{source}: neurons[{i}]") for i, n in enumerate(data["neurons"])]
        _check_name(data["name"], source)
        return cls(data["name"], str(data["concept"]), neurons, data.get("provenance", {}))

    def save(self, directory: str | Path) -> Path:
        _check_name(self.name, "direction")
        path = Path(directory) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


def _neuron_from_dict(n, where: str) -> DirectionNeuron:
    if not isinstance(n, dict):
        raise ValueError(f"{where} must be a map with layer, index, sign, score, tokens")
    unknown = sorted(set(n) - set(DirectionNeuron.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    layer, index, sign = n.get("layer"), n.get("index"), n.get("sign", 1.0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (layer, index)):
        raise ValueError(f"{where}: layer and index must be non-negative integers, got {layer!r}, {index!r}")
    if sign not in (1, -1, 1.0, -1.0):
        raise ValueError(f"{where}: sign must be 1 or -1, got {sign!r}")
    tokens = n.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}: tokens must be a list of strings")
    return DirectionNeuron(layer, index, float(sign), float(n.get("score", 0.0)), tokens)


def _check_name(name, source: str) -> None:
    """A direction name becomes a file name and a knob name: no paths, nothing empty."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*", name) or ".." in name:
        raise ValueError(
            f"{source}: direction name {name!r} must be letters, digits and _ . : + - (no paths)"
        )


def load_directions(directory: str | Path) -> dict[str, Direction]:
    """Every direction saved in a directory, by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directions directory {directory} does not exist")
    out = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == "vla-steer/direction":
            d = Direction.from_dict(data, source=str(path))
            out[d.name] = d
    return out


# -- the paper repo's dictionary YAML -------------------------------------------------------------


def export_paper_yaml(
    directions: list[Direction], d_mlp: int, path: str | Path | None = None, *, drop_negative: bool = False
) -> str:
    """`{name: {layer * d_mlp + neuron: [tokens]}}`, the format of the paper's dictionaries.yaml.

    That format has no sign (the paper clamps every neuron to the same value), so a neuron of
    negative polarity cannot be written faithfully: it is an error unless `drop_negative` leaves it out.
    """
    doc = {}
    for d in directions:
        negative = [(n.layer, n.index) for n in d.neurons if n.sign < 0]
        if negative and not drop_negative:
            raise ValueError(
                f"direction {d.name!r} has negative-polarity neurons {negative[:5]}... the paper format "
                "cannot express; pass drop_negative=True to export only the positive ones"
            )
        doc[d.name] = {n.layer * d_mlp + n.index: list(n.tokens) for n in d.neurons if n.sign > 0}
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def import_paper_yaml(
    source: str | Path, d_mlp: int, *, concept: str | None = None, names: list[str] | None = None
) -> dict[str, Direction]:
    """Read the paper's dictionaries YAML (a path or YAML text) into Directions (sign +1, as the paper clamps)."""
    if d_mlp < 1:
        raise ValueError(f"d_mlp must be a positive number of neurons per layer, got {d_mlp}")
    text = Path(source).read_text(encoding="utf-8") if _is_path(source) else str(source)
    doc = parse_yaml(text) or {}  # a repeated dictionary name or index is refused, not silently merged
    if not isinstance(doc, dict):
        raise ValueError("paper dictionary YAML must map dictionary names to {flat_index: [tokens]}")
    out = {}
    for name, entries in doc.items():
        if names is not None and name not in names:
            continue
        entries = entries or {}
        if not isinstance(entries, dict):
            raise ValueError(
                f"dictionary {name!r}: expected {{flat_index: [tokens]}}, got {type(entries).__name__}"
            )
        neurons = []
        _check_name(str(name), "paper dictionary")
        for flat, tokens in entries.items():
            try:
                flat = int(flat)
            except (TypeError, ValueError):
                raise ValueError(f"dictionary {name!r}: key {flat!r} is not a flat neuron index") from None
            if flat < 0:
                raise ValueError(f"dictionary {name!r}: negative flat index {flat}")
            if tokens is not None and not isinstance(tokens, list):
                raise ValueError(f"dictionary {name!r}: neuron {flat} must map to a list of tokens")
            neurons.append(
                DirectionNeuron(flat // d_mlp, flat % d_mlp, 1.0, 0.0, [str(t) for t in tokens or []])
            )
        out[str(name)] = Direction(
            str(name), concept or str(name), neurons, {"method": "paper-dictionary", "d_mlp": d_mlp}
        )
    return out


def _is_path(source) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in str(source) and Path(str(source)).exists()
