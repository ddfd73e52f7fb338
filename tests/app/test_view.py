"""`vla-steer view`: rollouts into rerun. The slow test runs the command from the rerun side venv
(rerun-sdk is a 170 MB wheel, an optional extra) and reads the .rrd back with rerun itself."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import VLA_STEER, side_python

from vla_steer.app.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from rollout_steps import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_view_refuses_what_it_cannot_show(tmp_path):
    run = subprocess.run(
        [VLA_STEER, "view", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "nowhere" in run.stderr and "does not exist" in run.stderr
    episode_id, _ = record(tmp_path / "run" / "rollouts", 2, seed=0)
    run = subprocess.run([VLA_STEER, "view", str(tmp_path / "run"), "--episode", "000009-deadbeef"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and f"no such episode in {tmp_path / 'run' / 'rollouts'}" in run.stderr
    assert episode_id in run.stderr  # the ones it has are listed
    assert main(["view", str(tmp_path / "run"), "--save", str(tmp_path / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_view_without_rerun_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    record(tmp_path, 1, seed=0)
    monkeypatch.setitem(sys.modules, "rerun", None)  # as if rerun-sdk were not installed
    assert main(["view", str(tmp_path), "--save", str(tmp_path / "out.rrd")]) == 2
    assert "pip install 'vla-steer[viewer]'" in capsys.readouterr().err
    assert not (tmp_path / "out.rrd").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_view_save_writes_an_rrd_that_rerun_reads_back(tmp_path):
    python = side_python("rerun", "VLA_STEER_RERUN_PYTHON")
    first, steps = record(tmp_path / "run" / "rollouts", 5, seed=1)
    second, _ = record(tmp_path / "run" / "rollouts", 3, seed=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def view(*args: str) -> subprocess.CompletedProcess:
        cmd = [python, "-m", "vla_steer", "view", str(tmp_path / "run"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    r = view("--episode", first, "--save", str(tmp_path / "one.rrd"))
    assert r.returncode == 0 and "1 episodes of" in r.stdout, r.stderr
    r = view("--save", str(tmp_path / "all.rrd"))
    assert r.returncode == 0 and "2 episodes of" in r.stdout, r.stderr

    def contents(path: Path) -> dict:
        r = subprocess.run([python, str(Path(__file__).with_name("rrd_contents.py")), str(path)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    one = contents(tmp_path / "one.rrd")
    ents = one["entities"]
    assert one["recordings"] == 1 and not any(second in p for p in ents)
    for name in (
        "camera/agentview",
        "camera/wrist",
        "ee/position",
        "action",
        "steering/fast",
        "activations/fast",
    ):
        assert ents[f"/{first}/{name}"]["steps"] == [0, 1, 2, 3, 4], name
    assert ents[f"/{first}/ee/trajectory"]["rows"] == 1 and ents[f"/{first}/events"]["steps"] == [2]
    wrist = [hashlib.sha256(s["images"]["wrist"].tobytes()).hexdigest() for s in steps]
    assert ents[f"/{first}/camera/wrist"]["frames"] == wrist  # the recorded frames, bit for bit
    every = contents(tmp_path / "all.rrd")["entities"]
    assert every[f"/{second}/camera/wrist"]["steps"] == [0, 1, 2] and f"/{first}/action" in every
