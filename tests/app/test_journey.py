"""The journey a user takes with a real checkpoint, per layout, every step the installed `vla-steer` command:
discover -> serve -> knobs set -> one short sim episode -> analyze -> export-lerobot.

The checkpoints are tiny but written in each real layout (demo VLA, OpenVLA official, pi0 LeRobot current
and original, pi0 openpi, pi0.5 LeRobot and openpi, pi0-FAST LeRobot); the sim episode is a real robosuite Lift whose cameras match the policy's keys.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from checkpoints import LAYOUTS, write_checkpoint, write_sim_config
from support import VLA_STEER, free_address, wait_for

from vla_steer.core.rollouts import open_store

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run([VLA_STEER, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, f"vla-steer {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_journey(layout, tmp_path):
    ckpt = write_checkpoint(layout, tmp_path)
    directions = tmp_path / "directions"

    r = run("discover", str(ckpt), "--out", str(directions), "--size", "4", "--poles", "slow,up")
    kind = {"demo": "tiny_vla", "openvla": "openvla", "pi0_fast": "pi0_fast"}.get(
        layout, layout.split("_")[0]
    )
    assert f"steerable stacks of this {kind}:" in r.stdout
    assert "language (" in r.stdout and "vocabulary projection -- used here" in r.stdout
    if kind in (
        "pi0",
        "pi05",
    ):  # the expert has no vocabulary: the command says so, and how to steer it instead
        assert "action_expert (2 layers x 64 neurons): no vocabulary" in r.stdout
        assert "contrast_directions" in r.stdout
    assert "wrote 2 directions" in r.stdout
    slow = json.loads((directions / "slow.json").read_text())
    assert len(slow["neurons"]) == 4 and slow["provenance"]["backbone"] == "language"

    address = free_address()
    # The tiny OpenVLA, like openvla-7b, has statistics for several datasets: the user picks one.
    options = ["--option", "unnorm_key=tiny_suite"] if layout == "openvla" else []
    serve = subprocess.Popen(
        [VLA_STEER, "serve", "--policy", str(ckpt), "--directions", str(directions), "--bind", address,
         *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        line = serve.stdout.readline()
        assert f"on {address} (knobs: slow, up)" in line, line or serve.stderr.read()

        r = run("knobs", "--server", address, "set", "slow=4")
        assert any(row.split()[:4] == ["slow", "on", "clamp", "4"] for row in r.stdout.splitlines()), r.stdout

        env_cfg = write_sim_config(layout, tmp_path / f"{layout}.yaml")
        runs = tmp_path / "runs"
        camera = next(iter(_cameras(env_cfg)))
        r = run(
            "sim", "--server", address, "--env", str(env_cfg), "--episodes", "1", "--max-steps", "3",
            "--out", str(runs), "--timeout", "60", "--steer", "slow=4", "--activations", "slow", "--video", camera,
        )  # fmt: skip
        assert f"{layout} " in r.stdout and "slow=4" in r.stdout and f"recorded in {runs}/" in r.stdout
        assert len(list((runs / "videos").glob("*.mp4"))) == 1
    finally:
        serve.terminate()
        try:
            out, _ = serve.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.communicate()
    assert "stopped" in out

    steps = open_store(runs).to_pandas()  # with each step, what the node's reply said beside the actions
    assert len(steps) == 3 and (steps["info_policy_ms"] > 0).all() and (steps["info_batch"] == 1).all()
    r = run("analyze", str(runs))
    assert "1 episodes in 1 settings" in r.stdout
    assert json.loads((runs / "summary.json").read_text())
    wait_for(lambda: (runs / "report.html").exists(), what="the report")

    dataset = tmp_path / "lerobot"
    r = run("export-lerobot", str(runs), str(dataset))
    assert "exported 1 episodes, 3 frames at 20 fps" in r.stdout
    assert "steering.strength, steering.enabled, activations.slow" in r.stdout
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["features"]["steering.strength"]["names"] == ["slow", "up"]
    assert info["features"]["activations.slow"]["shape"][0] % 4 == 0  # forwards x the direction's 4 neurons
    import pyarrow.parquet as pq

    table = pq.read_table(dataset / "data" / "chunk-000" / "file-000.parquet")
    assert table.column("steering.strength").to_pylist() == [[4.0, 0.0]] * 3
    assert table.column("steering.enabled").to_pylist() == [[True, False]] * 3


def _cameras(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["cameras"]
