"""Direction artifacts and the paper repo's dictionary YAML."""

from __future__ import annotations

import json

import pytest

from vla_steer.core.discovery.direction import (
    Direction,
    DirectionNeuron,
    export_paper_yaml,
    import_paper_yaml,
    load_directions,
)

# Two entries in the shape of the paper repo's openvla dictionaries.yaml (flat index = layer * 11008 + neuron).
PAPER = """\
blank: {}

up_2:
  237682: ['up', 'Up', '[action: -0.227]', '[action: 0.824]', 'дар']
  302720: ['raised', 'raise', 'raising', 'larger', 'rais', 'high', 'High', 'Low']
"""


def test_paper_yaml_imports_with_flat_indices_split():
    dirs = import_paper_yaml(PAPER, d_mlp=11008)
    assert set(dirs) == {"blank", "up_2"}
    up = dirs["up_2"]
    assert [(n.layer, n.index) for n in up.neurons] == [(21, 6514), (27, 5504)]
    assert up.neurons[0].tokens[:2] == ["up", "Up"] and up.neurons[0].tokens[4] == "дар"
    assert all(n.sign == 1.0 for n in up.neurons) and dirs["blank"].neurons == []


def test_paper_yaml_round_trips(tmp_path):
    dirs = import_paper_yaml(PAPER, d_mlp=11008)
    path = tmp_path / "dicts.yaml"
    export_paper_yaml(list(dirs.values()), 11008, path)
    again = import_paper_yaml(path, d_mlp=11008)
    for name in dirs:
        assert [(n.layer, n.index, n.tokens) for n in again[name].neurons] == [
            (n.layer, n.index, n.tokens) for n in dirs[name].neurons
        ]


def test_export_refuses_to_lose_a_sign():
    d = Direction("fast", "speed", [DirectionNeuron(3, 4, 1.0), DirectionNeuron(5, 6, -1.0)])
    with pytest.raises(ValueError, match="negative-polarity"):
        export_paper_yaml([d], 100)
    text = export_paper_yaml([d], 100, drop_negative=True)
    assert "304" in text and "506" not in text


def test_paper_yaml_errors():
    with pytest.raises(ValueError, match="not a flat neuron index"):
        import_paper_yaml("up:\n  abc: [up]\n", d_mlp=10)
    with pytest.raises(ValueError, match="expected"):
        import_paper_yaml("up: [1, 2]\n", d_mlp=10)


def test_direction_save_load_and_bad_files(tmp_path):
    d = Direction(
        "up", "height", [DirectionNeuron(1, 2, -1.0, 3.5, ["up", "[action +0.5]"])], {"method": "lexicon"}
    )
    d.save(tmp_path)
    (tmp_path / "notes.json").write_text(json.dumps({"something": "else"}))  # ignored: not a direction
    loaded = load_directions(tmp_path)
    assert list(loaded) == ["up"] and loaded["up"] == d
    assert [tuple(vars(n).values()) for n in d.steer_neurons()] == [(1, 2, -1.0)]
    data = d.to_dict() | {"format_version": 99}
    with pytest.raises(ValueError, match="format_version 99"):
        Direction.from_dict(data)
    with pytest.raises(ValueError, match=r"missing keys \['neurons'\]"):
        Direction.from_dict({"format_version": 1, "name": "x", "concept": "y"})
    with pytest.raises(FileNotFoundError):
        load_directions(tmp_path / "absent")


@pytest.mark.parametrize(
    ("neuron", "message"),
    [
        ({"layer": 1.0, "index": 2}, "non-negative integers"),
        ({"layer": 1, "index": 2, "sign": "1"}, "sign must be 1 or -1"),
        ({"layer": 1, "index": 2, "tokens": "up"}, "list of strings"),
        ({"layer": 1, "index": 2, "colour": "red"}, "unknown keys"),
    ],
)
def test_malformed_direction_files_name_the_neuron(neuron, message):
    data = {"format_version": 1, "name": "up", "concept": "height", "neurons": [neuron]}
    with pytest.raises(ValueError, match=rf"up.json: neurons\[0\].*{message}"):
        Direction.from_dict(data, source="up.json")


def test_names_that_would_escape_the_directory_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no paths"):
        import_paper_yaml("../escape:\n  5: [up]\n", d_mlp=10)
    with pytest.raises(ValueError, match="list of tokens"):
        import_paper_yaml("up:\n  5: fast\n", d_mlp=10)
    with pytest.raises(ValueError, match="no paths"):
        Direction("a/b", "c", []).save(tmp_path)


def test_paper_yaml_with_a_repeated_key_is_refused():
    from vla_steer.core.config import DuplicateKeyError

    with pytest.raises(DuplicateKeyError, match="fast"):
        import_paper_yaml("fast: {5: [a]}\nfast: {7: [b]}\n", d_mlp=4)
