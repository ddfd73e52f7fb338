"""The `vla-steer` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess

import pytest
from support import VLA_STEER

from vla_steer.app.cli import main
from vla_steer.app.cli.args import parse_layers, parse_size
from vla_steer.wire import parse_setting


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLA_STEER, *args], capture_output=True, text=True, timeout=300)


def test_discover_writes_directions_and_reuses_the_index(llama_dir, tmp_path):
    out = tmp_path / "dirs"
    r = run_cli(
        "discover",
        str(llama_dir),
        "--out",
        str(out),
        "--poles",
        "fast,up",
        "--size",
        "5",
        "--layers",
        "1-3",
        "-v",
    )
    assert r.returncode == 0, r.stderr
    assert "fast (speed): 5 neurons" in r.stdout and "layer  neuron sign  score  tokens" in r.stdout
    assert "computing neuron index" in r.stderr and "projecting" in r.stderr  # progress bar
    saved = json.loads((out / "fast.json").read_text())
    assert len(saved["neurons"]) == 5 and all(1 <= n["layer"] <= 3 for n in saved["neurons"])
    assert (out / "index" / "neuron_index.safetensors").exists()
    again = run_cli(
        "discover",
        str(llama_dir),
        "--out",
        str(out),
        "--poles",
        "fast",
        "--size",
        "5",
        "--layers",
        "1-3",
        "-v",
    )
    assert again.returncode == 0 and "reusing neuron index" in again.stderr
    assert json.loads((out / "fast.json").read_text())["neurons"] == saved["neurons"]


def test_discover_errors_are_clear(llama_dir, tmp_path, capsys):
    assert main(["discover", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown poles"):
        main(["discover", str(llama_dir), "--poles", "sideways", "--out", str(tmp_path)])
    r = run_cli("discover", str(llama_dir), "--layers", "9-2")
    assert r.returncode == 2 and "empty" in r.stderr


def test_paper_dict_import_then_export(tmp_path):
    src = tmp_path / "dictionaries.yaml"
    src.write_text("up_10:\n  237682: ['up', 'Up']\n  302720: ['raised']\n")
    assert main(["paper-dict", "import", str(src), "--d-mlp", "11008", "--out", str(tmp_path / "d")]) == 0
    assert (
        main(
            [
                "paper-dict",
                "export",
                str(tmp_path / "d"),
                "--d-mlp",
                "11008",
                "--out",
                str(tmp_path / "x.yaml"),
            ]
        )
        == 0
    )
    assert "237682" in (tmp_path / "x.yaml").read_text()


def test_parsers():
    assert parse_size("1GiB") == 2**30 and parse_size("512MB") == 512_000_000 and parse_size("1000") == 1000
    assert parse_layers("15-31") == (15, 31) and parse_layers("7") == (7, 7)
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
    assert parse_setting("off") == {} and parse_setting("fast=4, up=-2") == {"fast": 4.0, "up": -2.0}
    with pytest.raises(ValueError, match="got 'fast'"):
        parse_setting("fast")
    with pytest.raises(ValueError, match="finite"):
        parse_setting("fast=inf")


def test_help_for_every_subcommand():
    for cmd in ("discover", "paper-dict", "demo", "train-demo", "analyze", "robot"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: vla-steer" in r.stdout


def test_demo_and_train_demo_refuse_bad_options(tmp_path, capsys):
    # (The demo itself runs end to end in tests/test_demo.py's slow suite.)
    assert main(["demo", "--out", str(tmp_path), "--strengths", "8,fast"]) == 2
    assert "--strengths: 'fast' is not a number" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--episodes", "0"]) == 2
    assert "--episodes" in capsys.readouterr().err
    assert main(["train-demo", "--out", str(tmp_path / "vla"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
