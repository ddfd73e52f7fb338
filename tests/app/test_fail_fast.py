"""Wrong usage is refused before any weights load, with a message naming the flag, file or key the user
typed. The checkpoints here have a corrupt weights file: a check that ran after loading would report that
instead of the wrong flag."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from checkpoints import write_checkpoint, write_sim_config
from support import VLA_STEER, free_address

from policies.pi0 import checkpoint as ckpt_files
from policies.resolve import LanguageModel, detect_kind, resolve_policy, resolve_target

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([VLA_STEER, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def refused(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: "), (r.returncode, r.stdout, r.stderr)
    return r.stderr


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_checkpoint(layout, root) for layout in ("openvla", "pi0_lerobot", "pi0_openpi")}


@pytest.fixture(scope="module")
def corrupt(layouts, tmp_path_factory):
    """Each layout with its weights file replaced by garbage (configs, stats and tokenizer intact)."""
    root = tmp_path_factory.mktemp("corrupt")
    out = {}
    for layout, path in layouts.items():
        out[layout] = shutil.copytree(path, root / layout)
        (out[layout] / ckpt_files.WEIGHTS).write_bytes(b"not safetensors")
    return out


# -- the resolver, from Python -------------------------------------------------------------------------


def test_every_layout_is_recognised(layouts, llama_dir, tmp_path):
    from checkpoints import DEMO, write_checkpoint

    original = write_checkpoint("pi0_lerobot_original", tmp_path)
    assert detect_kind(DEMO) == "tiny_vla"
    assert detect_kind(layouts["openvla"]) == "openvla"
    assert {detect_kind(layouts[k]) for k in ("pi0_lerobot", "pi0_openpi")} | {detect_kind(original)} == {
        "pi0"
    }
    assert isinstance(resolve_target(llama_dir), LanguageModel)
    assert resolve_policy("demo_vla").kind == "tiny_vla"  # a shipped config's name
    cfg = resolve_policy(layouts["openvla"], settings={"unnorm_key": "tiny_suite"}, device="cpu")
    assert (cfg.kind, cfg.unnorm_key, cfg.path) == ("openvla", "tiny_suite", layouts["openvla"].resolve())


def test_a_plain_language_model_is_not_a_policy(llama_dir):
    with pytest.raises(ValueError, match="plain language model, not a policy: `vla-steer discover` takes it"):
        resolve_policy(llama_dir)


# -- discover ------------------------------------------------------------------------------------------


def test_discover_checks_layers_and_size_against_config_json(corrupt, tmp_path):
    out = str(tmp_path / "d")
    err = refused("discover", str(corrupt["openvla"]), "--layers", "2-9", "--out", out)
    assert "--layers 2-9:" in err and "has 4 layers (0-3)" in err
    err = refused("discover", str(corrupt["pi0_lerobot"]), "--size", "1000", "--out", out)
    assert "--size 1000: layers 0-1" in err and "hold only 256 neurons (128 per layer)" in err


def test_discover_names_wrong_kind_options_and_offline_hub_ids(corrupt, tmp_path):
    err = refused("discover", str(corrupt["openvla"]), "--kind", "pi0")
    assert "holds a checkpoint of kind openvla, but --kind pi0 was given" in err
    err = refused("discover", str(corrupt["pi0_lerobot"]), "-o", "frobnicate=1")
    assert "--option frobnicate: a pi0 policy has no option 'frobnicate'" in err
    err = refused("discover", str(corrupt["pi0_lerobot"]), "--dtype", "float16")
    assert "--dtype: Input should be 'float32' or 'bfloat16'" in err
    err = refused("discover", "someone/pi0_libero")  # HF_HUB_OFFLINE, nothing cached
    assert "not a local path, and its config.json could not be fetched from the hub" in err
    err = refused("discover", str(tmp_path))
    assert "neither policy_config.json" in err and "not a checkpoint directory" in err


# -- serve ---------------------------------------------------------------------------------------------


def test_serve_refuses_a_used_port_before_loading(corrupt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        err = refused("serve", "--policy", str(corrupt["pi0_lerobot"]), "--bind", address)
    assert f"--bind {address}: cannot listen there" in err and "Choose another port" in err


def test_knobs_ui_refuses_a_used_port_before_connecting():
    """The policy and robot addresses are listening sockets: the refused page must not have dialled either."""
    with socket.socket() as busy, socket.socket() as policy, socket.socket() as robot:
        for s in (busy, policy, robot):
            s.bind(("127.0.0.1", 0))
            s.listen()
        port = busy.getsockname()[1]
        policy_at, robot_at = (f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in (policy, robot))
        err = refused("knobs", "--server", policy_at, "ui", "--robot", robot_at, "--port", str(port))
        for s in (policy, robot):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()
    assert f"--port {port} on 127.0.0.1: cannot listen there" in err and "knobs ui` running?" in err


def test_knobs_ui_names_its_flags_for_a_remote_bind_and_a_bad_port():
    err = refused("knobs", "ui", "--bind", "0.0.0.0", "--port", "0")
    assert "--bind 0.0.0.0" in err and "--allow-remote" in err and "allow_remote=True" not in err
    assert "--port 70000: a TCP port is 0..65535" in refused("knobs", "ui", "--port", "70000")


def test_serve_names_its_flags_for_an_insecure_bind(corrupt):
    err = refused("serve", "--policy", str(corrupt["pi0_lerobot"]), "--bind", "tcp://0.0.0.0:5599")
    assert "--allow-insecure" in err and "--keypair" in err and "allow_insecure=True" not in err


def test_serve_refuses_directions_of_another_model(corrupt, checkpoint):
    # The demo-sized TinyVLA's directions (checkpoint fixture) name neurons the tiny pi0 does not have.
    err = refused(
        "serve", "--policy", str(corrupt["pi0_lerobot"]), "--directions", str(checkpoint / "directions")
    )
    assert f"--directions {checkpoint / 'directions'}:" in err and "made for another model?" in err


def test_serve_asks_for_unnorm_key_before_loading(corrupt):
    err = refused("serve", "--policy", str(corrupt["openvla"]))
    assert "--option unnorm_key=NAME" in err and "['other_suite', 'tiny_suite']" in err
    err = refused("serve", "--policy", str(corrupt["openvla"]), "-o", "unnorm_key=libero_10")
    assert "unnorm_key 'libero_10' is not in" in err


def test_serve_refuses_plan_positions_for_a_policy_that_says_no_plan(corrupt):
    err = refused(
        "serve", "--policy", str(corrupt["openvla"]), "-o", "unnorm_key=tiny_suite", "--positions", "plan"
    )
    assert "--positions plan" in err and "says no plan" in err and "all or last" in err


def test_serve_refuses_a_plain_language_model(llama_dir):
    assert "not a policy" in refused("serve", "--policy", str(llama_dir))


# -- sim, eval, robot ----------------------------------------------------------------------------------


def test_sim_checks_the_video_camera_before_connecting(tmp_path):
    env = write_sim_config("pi0_lerobot", tmp_path / "two_cams.yaml")
    # No policy node runs: a late check would exit 3 (no node) instead.
    err = refused("sim", "--env", str(env), "--out", str(tmp_path / "runs"), "--video", "agentview")
    assert "--video agentview: two_cams records the cameras ['image', 'wrist_image']" in err


def test_sim_says_eval_runs_libero(tmp_path):
    err = refused("sim", "--env", "libero_10", "--out", str(tmp_path / "runs"))
    assert "a LIBERO config; LIBERO runs in its own venv, driven by `vla-steer eval`" in err
    assert "vla-steer eval --env libero_10:0" in err


def test_eval_checks_the_grid_before_connecting(tmp_path):
    """No policy node runs: each of these would exit 3 (no node) if it were checked late."""
    out = str(tmp_path / "runs")
    assert "--env libero_spatial:3,12: tasks [12] out of range (0..9)" in refused(
        "eval", "--env", "libero_spatial:3,12", "--out", out
    )
    assert "a task list (:0) is for LIBERO suites" in refused(
        "eval", "--env", "robosuite_lift:0", "--out", out
    )
    assert "--shard 3/2: expected 1 <= i <= N" in refused(
        "eval", "--env", "robosuite_lift", "--shard", "3/2", "--out", out
    )
    assert "--shard 1of2" in refused("eval", "--env", "robosuite_lift", "--shard", "1of2", "--out", out)
    assert "--workers 0" in refused("eval", "--env", "robosuite_lift", "--workers", "0", "--out", out)
    assert "a setting is given twice" in refused(
        "eval", "--env", "robosuite_lift", "--settings", "off", "off", "--out", out
    )
    assert "--policy is for --ray" in refused(
        "eval", "--env", "robosuite_lift", "--policy", "demo_vla", "--out", out
    )
    assert "--ray needs --policy" in refused("eval", "--env", "robosuite_lift", "--ray", "--out", out)
    assert not (tmp_path / "runs").exists()


def test_eval_starts_at_the_profiles_first_seed_and_refuses_tasks_that_disagree(tmp_path):
    """LeRobot's LIBERO evaluations seed episode i with 1000 + i: a grid over a config naming that profile
    starts there unless --seed says otherwise; with a task starting at 0 beside it, --seed must decide."""
    from sim.grid import Grid
    from vla_steer.app.cli.sim import _first_seed

    lerobot = tmp_path / "lerobot_spatial.yaml"
    lerobot.write_text("kind: libero\nsuite: libero_spatial\nprofile: lerobot_pi0_libero\n")
    assert _first_seed(Grid.build([f"{lerobot}:0,1"], [{}], 2).tasks) == 1000
    assert _first_seed(Grid.build(["libero_spatial:0", "robosuite_lift"], [{}], 2).tasks) == 0
    out = str(tmp_path / "runs")
    err = refused("eval", "--env", f"{lerobot}:0", "--env", "robosuite_lift", "--out", out)
    assert "--seed: the tasks' configs start at different seeds" in err and "1000" in err
    r = subprocess.run(  # with --seed, past that check: to the policy node, which is not running (3)
        [VLA_STEER, "eval", "--env", f"{lerobot}:0", "--env", "robosuite_lift", "--seed", "7", "--out", out,
         "--server", free_address()],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr


def test_eval_says_the_libero_venv_is_missing_before_connecting(tmp_path):
    """Before: found by a worker (exit 4), or under --ray after the weights loaded; here no node runs (3)."""
    r = subprocess.run(
        [VLA_STEER, "eval", "--env", "libero_spatial:0", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=120,
        env={**ENV, "VLA_STEER_LIBERO_PYTHON": str(tmp_path / "no-venv" / "bin" / "python")},
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: LIBERO tasks run in the LIBERO venv"), r.stderr
    assert "`make libero`" in r.stderr and "$VLA_STEER_LIBERO_PYTHON" in r.stderr


def test_robot_says_a_sim_config_is_one():
    from vla_steer.core.config import shipped

    sim_config = str(shipped("sims") / "robosuite_lift.yaml")
    err = refused("robot", "--backend", "mujoco", "--config", sim_config, "--out", "/nonexistent/x")
    assert "is a sim config (kind: robosuite)" in err and "vla-steer sim --env" in err


# -- export-lerobot ------------------------------------------------------------------------------------


def test_export_lerobot_refuses_a_missing_store_and_a_used_output(tmp_path):
    assert "STORE" in refused("export-lerobot", str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "store").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "is not an empty directory" in refused(
        "export-lerobot", str(tmp_path / "store"), str(tmp_path / "out")
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
