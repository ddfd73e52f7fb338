"""Shipped configs: found by name, validated with errors that name the file, and present in an installed wheel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vla_steer.core.config import GROUPS, resolve_config, shipped

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_ships_configs(group):
    assert sorted(shipped(group).glob("*.yaml")), group


def test_a_name_resolves_to_the_shipped_config_and_a_path_wins(tmp_path, monkeypatch):
    assert resolve_config("robosuite_lift", "sims") == shipped("sims") / "robosuite_lift.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "robosuite_lift").write_text(
        "task: Stack\n"
    )  # a local file of that name is what the user means
    assert resolve_config("robosuite_lift", "sims") == Path("robosuite_lift")
    assert resolve_config("mine.yaml", "sims") == Path("mine.yaml")  # a path is never looked up by name


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"no_such_sim.*robosuite_lift"):
        resolve_config("no_such_sim", "sims")
    with pytest.raises(ValueError, match="unknown config group"):
        shipped("robot")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_installed_wheel_finds_its_configs_and_the_demo_weights(tmp_path):
    """Build the wheel, install it alone into a directory, import from there (not from this checkout)."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True, timeout=500)
    (wheel,) = wheels.glob("vla_steer-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=120)
    code = (
        "import json, vla_steer; from policies import read_policy_config; from vla_steer.core.config import shipped;"
        "print(json.dumps({'pkg': vla_steer.__file__, 'weights': str(read_policy_config('demo_vla').path),"
        "'concepts': sorted(p.name for p in shipped('concepts').glob('*.yaml'))}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    found = json.loads(out.stdout)
    assert found["pkg"].startswith(str(site))
    assert (
        found["weights"].startswith(str(site)) and (Path(found["weights"]) / "policy_config.json").is_file()
    )
    assert {"speed.yaml", "height.yaml"} <= set(found["concepts"])


def test_a_key_given_twice_is_refused_in_every_config(tmp_path):
    """Every config goes through load_yaml_model: a repeated key names the file, the key and both lines."""
    from pydantic import BaseModel

    from vla_steer.core.config import load_yaml, load_yaml_model

    class Limits(BaseModel):
        max_linear_speed: float
        nested: dict = {}

    path = tmp_path / "robot.yaml"
    path.write_text("max_linear_speed: 0.15\nnested: {a: 1}\nmax_linear_speed: 2.0\n")
    with pytest.raises(
        ValueError, match=r"robot\.yaml: key 'max_linear_speed' appears twice \(lines 1 and 3\)"
    ):
        load_yaml_model(path, Limits)
    path.write_text("max_linear_speed: 0.15\nnested:\n  a: 1\n  b: 2\n  a: 3\n")
    with pytest.raises(ValueError, match=r"key 'a' appears twice \(lines 3 and 5\)"):
        load_yaml_model(path, Limits)
    path.write_text("max_linear_speed: 0.15\nnested: {a: 1, b: 2}\n")
    assert load_yaml_model(path, Limits).nested == {"a": 1, "b": 2}
    # A merge key may be overridden (that is what it is for): not a repeat.
    path.write_text("base: &b {a: 1, b: 2}\nnested:\n  <<: *b\n  a: 3\n")
    assert load_yaml(path)["nested"] == {"a": 3, "b": 2}


@pytest.mark.parametrize("group", GROUPS)
def test_shipped_configs_have_no_repeated_keys(group):
    from vla_steer.core.config import load_yaml

    for path in shipped(group).glob("*.yaml"):
        load_yaml(path)  # raises DuplicateKeyError


@pytest.mark.parametrize("path", sorted(shipped("policies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_policy_configs_point_where_their_comments_say(path):
    """A checkpoint path is relative to its YAML file: a shipped one must land in the checkout (or the demo's
    package), never inside vla_steer/ where no checkpoint lives (the configs moved one level deeper once)."""
    from policies import read_policy_config

    cfg = read_policy_config(path)
    if not cfg.path.is_absolute():  # a hub id
        return
    package = shipped("policies").parents[1]  # .../vla_steer
    assert package not in cfg.path.parents, f"{path.name}: path resolves to {cfg.path}"
    if path.stem == "demo_vla":
        assert (cfg.path / "policy_config.json").is_file()
