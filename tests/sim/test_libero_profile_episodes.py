"""LIBERO episodes under each evaluation profile, end to end through the installed commands: `vla-steer serve` a
tiny checkpoint of the profile's family (tests/checkpoints.py, in its real layout), then the LIBERO node (its
own venv) runs two short episodes of libero_spatial task 0 under the profile.

What was recorded must carry every convention (the profile's name and settings, chunk length and steps executed
per chunk, render and policy resolution, each episode's initial state), and must show that what ran is what the
profile says: inferences against executed steps, the gripper mapping on the executed action, the wait steps run
before the first recorded step and never sent to the policy, openpi's state-relative actions made absolute.
The refusal of a policy of another family goes through the same commands.
"""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from checkpoints import write_checkpoint
from support import LIBERO_PYTHON, VLA_STEER, run_libero, serving

from sim.base import to_osc_action
from vla_steer.core.config import load_yaml, shipped
from vla_steer.core.rollouts import open_store

needs_libero = pytest.mark.skipif(
    not LIBERO_PYTHON.exists(),
    reason=f"no LIBERO venv at {LIBERO_PYTHON}: build it with `bash scripts/make_libero_venv.sh`",
)
# What the openpi profiles say to serve a checkpoint with (an openpi config lacks them); pi0's actions are
# state-relative on dims 0-5, pi0.5's are not.
OPENPI05_OPTIONS = (
    "state_dim=8", "action_dim=7", "openpi_image_keys=[base_0_rgb, left_wrist_0_rgb]", "n_action_steps=6", "seed=0",
)  # fmt: skip
OPENPI_OPTIONS = ("relative_action_dims=6", *OPENPI05_OPTIONS)
# profile -> (checkpoint layout, `vla-steer serve` options, executed steps per episode)
CASES = {
    "openvla_libero": ("openvla", (), 4),
    "openpi_pi0_libero": ("pi0_openpi", OPENPI_OPTIONS, 7),
    "lerobot_pi0_libero": ("pi0_lerobot", ("seed=0",), 6),
    "openpi_pi05_libero": ("pi05_openpi", OPENPI05_OPTIONS, 7),
    "lerobot_pi05_libero": ("pi05_lerobot", ("seed=0",), 6),
}
FINGER = 6  # state: eef pos (3), axis-angle (3), finger joints (2)


def openvla_libero_finetune(tmp_path):
    """The tiny OpenVLA as a LIBERO fine-tune looks to the evaluation: statistics of a LIBERO dataset (so its
    centre crop defaults on, as the official script's), with the gripper un-normalised into [0.98, 1.0]: every
    action says "open", as a fine-tune's first actions do. LIBERO must get -1 (open); under LIBERO's own
    `close_positive` the gripper would close."""
    ckpt = write_checkpoint("openvla", tmp_path)
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())["tiny_suite"]
    action = stats["action"]
    action["q01"][6], action["q99"][6], action["mask"][6] = 0.98, 1.0, True
    (ckpt / "dataset_statistics.json").write_text(json.dumps({"libero_spatial_no_noops": stats}))
    return ckpt


def run_profile(name: str, tmp_path) -> list:
    layout, options, steps = CASES[name]
    ckpt = openvla_libero_finetune(tmp_path) if layout == "openvla" else write_checkpoint(layout, tmp_path)
    out = tmp_path / "run"
    with serving(ckpt, *(f"--option={o}" for o in options)) as address:
        r = run_libero(
            ["-m", "sim.libero_node", "--env", name, "--suite", "libero_spatial", "--server", address,
             "--episodes", "2", "--max-steps", str(steps), "--timeout", "60", "--out", str(out)]
        )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "over 2 episodes" in r.stdout, r.stdout
    store = open_store(out)
    episodes = [store.load(info.id) for info in store.episodes()]
    assert len(episodes) == 2 and all(ep.meta["length"] == steps for ep in episodes)
    return episodes


def check_recorded(name: str, episodes: list) -> int:
    """The conventions every episode records, and the chunking and wait steps it shows; returns the steps
    executed per chunk."""
    profile = load_yaml(shipped("profiles") / f"{name}.yaml")
    steps = CASES[name][2]
    for i, ep in enumerate(episodes):
        meta, conv = ep.meta, ep.meta["conventions"]
        assert conv["profile"] == meta["sim_config"]["profile"] == name
        assert conv["reference"] == profile["reference"]
        for key, value in profile.items():  # every setting as the profile sets it, but the flag's max steps
            assert meta["sim_config"][key] == (steps if key == "max_steps" else value), key
        assert conv["max_steps"] == steps
        announced = meta["policy_conventions"]
        assert all(announced[k] == v for k, v in profile["expect"].items())  # what the policy said in hello
        # the episode's initial state: episode i starts from init state first_seed + i, in order
        assert meta["init_state_index"] == (profile["first_seed"] + i) % 50 and meta["n_init_states"] == 50
        assert meta["seed"] == profile["first_seed"] + i
        # resolution: rendered at the profile's size, handed to the policy at its own
        assert conv["render_resolution"] == [profile["render_size"]] * 2
        for key, image in ep.images.items():
            assert conv["policy_resolution"][key] == list(image.shape[1:3]), key
        assert set(ep.images) == set(conv["policy_resolution"]) <= set(profile["cameras"])
        # chunking: `execute_steps` actions of each chunk (the profile's, else the policy's whole chunk)
        chunk = ep.arrays["action_chunk"]
        assert conv["chunk_length"] == chunk.shape[1]
        executed = profile["execute_steps"] or chunk.shape[1]
        assert conv["executed_per_chunk"] == executed
        assert meta["summary"]["inferences"] == math.ceil(steps / executed)
        k = np.arange(steps)
        assert np.array_equal(ep.arrays["action"], chunk[k, k % executed])
        # the wait steps: `settle_steps` dummy actions (gripper open) before the first recorded step, none of
        # them an inference (counted above); 20 Hz
        assert ep.arrays["t_sim"][0] == pytest.approx((profile["settle_steps"] + 1) * 0.05)
        assert ep.arrays["state"][0, FINGER] > 0.035  # the dummy action's -1 opened the gripper
    return executed


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_openpi_pi0_profile_runs_libero_episodes_as_openpi_does(tmp_path):
    """A chunk of 6, 5 actions executed from each (openpi's replan_steps), and the checkpoint's state-relative
    actions returned absolute: the served chunk equals the same policy's relative output plus the state the
    env sent, on dims 0-5."""
    episodes = run_profile("openpi_pi0_libero", tmp_path)
    assert check_recorded("openpi_pi0_libero", episodes) == 5
    for ep in episodes:  # a new chunk exactly every 5 steps (the node's noise differs every inference)
        chunk = ep.arrays["action_chunk"]
        same = [np.array_equal(chunk[k], chunk[k - 1]) for k in range(1, len(chunk))]
        assert same == [k % 5 != 0 for k in range(1, len(chunk))]

    from policies import Pi0PolicyConfig, load_policy
    from vla_steer.wire import Observation

    policy = load_policy(
        Pi0PolicyConfig(
            kind="pi0", path=tmp_path / "pi0_openpi", state_dim=8, action_dim=7, n_action_steps=6, seed=0,
            openpi_image_keys=["base_0_rgb", "left_wrist_0_rgb"],
        )
    )  # fmt: skip  # as served, less relative_action_dims
    ep = episodes[0]
    policy.reset()  # the node's reset before the episode: the same noise
    obs = Observation(ep.meta["instruction"], {k: v[0] for k, v in ep.images.items()}, ep.arrays["state"][0])
    relative = policy.infer(obs).actions
    state = ep.arrays["state"][0]
    mask = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)
    assert np.allclose(ep.arrays["action_chunk"][0], relative + state[:7] * mask, atol=1e-4)
    assert not np.allclose(ep.arrays["action_chunk"][0], relative, atol=1e-3)  # the state is not ~0


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vla_steer_eval_runs_a_grid_under_a_profile(tmp_path):
    """`vla-steer eval` over a LIBERO task of a sim config that names the openpi pi0 profile: its workers run
    the episodes as the profile says (5 actions per chunk although the flag sets none), recorded with it."""
    layout, options, steps = CASES["openpi_pi0_libero"]
    ckpt = write_checkpoint(layout, tmp_path)
    config = tmp_path / "openpi_spatial.yaml"
    config.write_text("kind: libero\nsuite: libero_spatial\nprofile: openpi_pi0_libero\n")
    out = tmp_path / "grid"
    with serving(ckpt, *(f"--option={o}" for o in options)) as address:
        r = subprocess.run(
            [VLA_STEER, "eval", "--server", address, "--env", f"{config}:0", "--settings", "off", "--episodes",
             "2", "--max-steps", str(steps), "--timeout", "60", "--out", str(out)],
            capture_output=True, text=True, timeout=540,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    store = open_store(out)
    episodes = sorted((store.load(i.id) for i in store.episodes()), key=lambda ep: ep.meta["seed"])
    assert [ep.meta["task_label"] for ep in episodes] == ["openpi_spatial:0"] * 2
    assert check_recorded("openpi_pi0_libero", episodes) == 5
    rows = json.loads((out / "eval.json").read_text())
    assert [(row["task"], row["setting"], row["episodes"]) for row in rows] == [
        ("openpi_spatial:0", "off", 2)
    ]


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_openvla_profile_runs_libero_episodes_as_openvla_does(tmp_path):
    """One action per inference, and the gripper mapped as OpenVLA's script does: its "open" (~1 in [0, 1])
    reaches LIBERO as -1, so the fingers stay open (LIBERO's own close_positive would close them)."""
    episodes = run_profile("openvla_libero", tmp_path)
    assert check_recorded("openvla_libero", episodes) == 1
    for ep in episodes:
        actions, fingers = ep.arrays["action"], ep.arrays["state"][:, FINGER]
        assert np.all((actions[:, 6] >= 0.98) & (actions[:, 6] <= 1.0))
        assert all(to_osc_action(a, "open_unit", True)[6] == -1.0 for a in actions)
        assert all(to_osc_action(a, "close_positive", False)[6] > 0.9 for a in actions)  # the wrong mapping
        assert fingers.min() > fingers[0] - 5e-4, fingers  # never closing
        conv = ep.meta["conventions"]
        assert conv["gripper"] == "open_unit" and conv["binarize_gripper"] is True
        assert conv["jpeg_quality"] == 95 and conv["resize"] == "tf_lanczos3"
        assert ep.meta["policy_conventions"]["center_crop"] == 0.9  # on by default for LIBERO statistics


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lerobot_pi0_profile_runs_libero_episodes_as_lerobot_eval_does(tmp_path):
    """The policy's whole chunk (its n_action_steps, 4) per inference, rendered at 360 and resized with padding
    to the checkpoint's 32, episodes seeded from 1000 (lerobot-eval's default)."""
    episodes = run_profile("lerobot_pi0_libero", tmp_path)
    assert check_recorded("lerobot_pi0_libero", episodes) == 4
    assert [ep.meta["seed"] for ep in episodes] == [1000, 1001]
    assert [ep.meta["init_state_index"] for ep in episodes] == [0, 1]


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["openpi_pi05_libero", "lerobot_pi05_libero"])
def test_pi05_profiles_run_libero_episodes_as_their_references(name, tmp_path):
    """pi0.5 (family pi05, absolute actions): openpi's 5 actions of each chunk, LeRobot's whole chunk."""
    episodes = run_profile(name, tmp_path)
    assert check_recorded(name, episodes) == (5 if name.startswith("openpi") else 4)
    for ep in episodes:
        assert ep.meta["policy_conventions"]["family"] == "pi05"
        assert ep.meta["policy_conventions"]["relative_mask"] is None


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_libero_node_refuses_an_openvla_policy_under_a_pi0_profile(tmp_path):
    """`vla-steer serve` a tiny OpenVLA, then the LIBERO node with the openpi pi0 profile: exit 2 naming what
    to change, before any episode runs."""
    ckpt = write_checkpoint("openvla", tmp_path)
    with serving(ckpt, "--option", "unnorm_key=tiny_suite") as address:
        r = run_libero(
            ["-m", "sim.libero_node", "--env", "openpi_pi0_libero", "--suite", "libero_spatial",
             "--server", address, "--out", str(tmp_path / "run")], timeout=240,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "refused" in r.stderr and "family = 'pi0', it announces 'openvla'" in r.stderr
    run = tmp_path / "run"
    assert not run.exists() or not list(open_store(run).episodes())  # refused before any episode
