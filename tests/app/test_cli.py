"""The `vla-steer` command line, run as a user runs it: the installed command, in a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import VLA_STEER, free_address

from vla_steer.app.cli import build_parser
from vla_steer.app.cli.args import parse_layers, parse_size
from vla_steer.core.config import shipped
from vla_steer.wire import parse_setting, split_setting


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VLA_STEER, *args], capture_output=True, text=True, timeout=timeout)


def test_discover_writes_directions_and_reuses_the_index(llama_dir, tmp_path):
    out = tmp_path / "dirs"
    args = [
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
    ]
    r = run_cli(*args, "-v")
    assert r.returncode == 0, r.stderr
    assert "fast (speed): 5 neurons" in r.stdout and "layer  neuron sign  score  tokens" in r.stdout
    assert "computing neuron index" in r.stderr and "projecting" in r.stderr  # progress bar
    saved = json.loads((out / "fast.json").read_text())
    assert len(saved["neurons"]) == 5 and all(1 <= n["layer"] <= 3 for n in saved["neurons"])
    assert (out / "index" / "neuron_index.safetensors").exists()
    again = run_cli(*args[:5], "fast", *args[6:], "-v")
    assert again.returncode == 0 and "reusing neuron index" in again.stderr
    assert json.loads((out / "fast.json").read_text())["neurons"] == saved["neurons"]


def test_discover_errors_are_clear(llama_dir, tmp_path):
    r = run_cli("discover", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("discover", str(llama_dir), "--poles", "sideways", "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown poles ['sideways']" in r.stderr
    r = run_cli("discover", str(llama_dir), "--layers", "9-2")
    assert r.returncode == 2 and "empty" in r.stderr


def test_paper_dict_import_then_export(tmp_path):
    src = tmp_path / "dictionaries.yaml"
    src.write_text("up_10:\n  237682: ['up', 'Up']\n  302720: ['raised']\n")
    r = run_cli("paper-dict", "import", str(src), "--d-mlp", "11008", "--out", str(tmp_path / "d"))
    assert r.returncode == 0 and "imported 1 dictionaries" in r.stdout, r.stderr
    r = run_cli(
        "paper-dict", "export", str(tmp_path / "d"), "--d-mlp", "11008", "--out", str(tmp_path / "x.yaml")
    )
    assert r.returncode == 0, r.stderr
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
    # A setpoint holds an axis at a target; its knobs and its targets go apart to the node.
    assert parse_setting("speed@0.10, up=2") == {"speed@": 0.1, "up": 2.0}
    assert split_setting({"speed@": 0.1, "up": 2.0}) == ({"up": 2.0}, {"speed": 0.1})
    for bad, wanted in (
        ("@0.1", "a setpoint names its axis"),
        ("speed@fast", "got 'speed@fast'"),
        ("speed@0.1,speed@0.2", "'speed@' is given twice"),
    ):
        with pytest.raises(ValueError, match=wanted):
            parse_setting(bad)


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_every_subcommand_has_help():
    names = _subcommands()
    assert {"discover", "serve", "knobs", "sim", "eval", "demo", "robot", "analyze"} <= set(names)
    r = run_cli("--help")
    assert r.returncode == 0 and all(name in r.stdout for name in names)
    for name in names:
        r = run_cli(name, "--help")
        assert r.returncode == 0 and f"usage: vla-steer {name}" in r.stdout, (name, r.stderr)
    for action in ("import", "export"):
        assert run_cli("paper-dict", action, "--help").returncode == 0


def test_a_config_is_found_by_its_shipped_name_and_an_unknown_name_lists_them(tmp_path):
    r = run_cli("eval", "--env", "no_such_config", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "argument --env: no_such_config" in r.stderr
    assert all(p.stem in r.stderr for p in shipped("sims").glob("*.yaml"))
    r = run_cli("serve", "--policy", "no_such_policy")
    assert r.returncode == 2 and "demo_vla" in r.stderr and "openvla_7b" in r.stderr
    # A shipped name gets past the config: the run fails only for want of a policy node.
    address = free_address()
    r = run_cli("sim", "--env", "robosuite_lift", "--server", address, "--out", str(tmp_path / "run"))
    assert r.returncode == 3 and f"no policy node answered at {address}" in r.stderr
    assert not (tmp_path / "run").exists()


def test_serve_a_shipped_policy_by_name_and_turn_its_knobs(tmp_path):
    """`vla-steer serve --policy demo_vla`: the bundled demo VLA, reached by name, answers `knobs list`."""
    address = free_address()
    serve = subprocess.Popen(
        [VLA_STEER, "serve", "--policy", "demo_vla", "--bind", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        line = serve.stdout.readline()
        assert f"serving demo-vla on {address} (knobs: none)" in line, (
            serve.stderr.read() if serve.poll() is not None else line  # (reading a live pipe would block)
        )
        r = run_cli("knobs", "list", "--server", address, "--timeout", "30")
        assert r.returncode == 0 and "no knobs" in r.stdout, r.stderr
    finally:
        serve.terminate()
        serve.wait(30)
    assert serve.returncode == 0


def test_demo_and_train_demo_refuse_bad_options(tmp_path, checkpoint):
    # (The demo itself runs end to end in test_demo.py's slow suite.)
    r = run_cli("demo", "--out", str(tmp_path), "--strengths", "8,fast")
    assert r.returncode == 2 and "--strengths: 'fast' is not a number" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--episodes", "1")
    assert r.returncode == 2 and "--episodes must be >= 2" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--controls", "0")
    assert r.returncode == 2 and "--controls" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--strengths", "8,-4")
    assert r.returncode == 2 and "--strengths must be distinct, positive" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--strengths", "8,8")
    assert r.returncode == 2 and "--strengths must be distinct" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--strengths", "8,inf")
    assert r.returncode == 2 and "'inf' is not a finite number" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path), "--weights", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "--weights" in r.stderr and "not a directory" in r.stderr
    # A TinyVLA that says no plan: the demo's default `--positions plan` is refused before anything runs.
    r = run_cli("demo", "--out", str(tmp_path), "--weights", str(checkpoint / "policy"))
    assert r.returncode == 2 and "--positions plan" in r.stderr and "use --positions all or last" in r.stderr
    r = run_cli("train-demo", "--out", str(tmp_path / "vla"), "--data", str(tmp_path / "none.npz"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    old = tmp_path / "old.npz"  # demonstrations written before they carried the cube's offset
    np.savez(
        old, images=np.zeros((1, 64, 64, 3), np.uint8), states=np.zeros((1, 8)), actions=np.zeros((1, 7))
    )
    r = run_cli("train-demo", "--out", str(tmp_path / "vla"), "--data", str(old))
    assert r.returncode == 2 and "has no cube, episode, speed, height, robot" in r.stderr, r.stderr
    r = run_cli("train-demo", "--out", str(tmp_path / "vla"), "--ur5e-per-setting", "-1")
    assert r.returncode == 2 and "--ur5e-per-setting at least 0" in r.stderr, r.stderr


def test_keys_refuses_to_overwrite_an_existing_keypair_without_force(tmp_path: Path) -> None:
    def keys(*extra: str) -> subprocess.CompletedProcess:
        return run_cli("keys", str(tmp_path), "server", *extra)

    secret = tmp_path / "server.key_secret"
    assert keys().returncode == 0
    first = secret.read_bytes()
    r = keys()
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr and secret.read_bytes() == first
    (tmp_path / "server.key").unlink()  # half a pair is still a pair: the secret is not replaced either
    assert keys().returncode == 2 and secret.read_bytes() == first
    r = keys("--force")
    assert r.returncode == 0 and secret.read_bytes() != first and (tmp_path / "server.key").exists()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
