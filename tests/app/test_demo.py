"""The bundled demo VLA: shipped weights, discovery on them, steering that moves the arm, and the pipeline.

Everything here is the real thing: the shipped checkpoint through the policy loader, robosuite physics and
rendering for the observations, the real discovery and Steerer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from support import VLA_STEER, serving

from policies import load_policy
from policies.demo import WEIGHTS
from vla_steer.app.demo.data import IMAGE_KEY, make_env
from vla_steer.app.demo.expert import HEIGHTS, SPEEDS, LiftExpert
from vla_steer.app.demo.language import BASELINE_INSTRUCTION, HEIGHT_WORDS, SPEED_WORDS
from vla_steer.app.demo.run import POLES, POSITIONS, SIZE, STRENGTHS, settings_grid
from vla_steer.core.config import resolve_config, shipped
from vla_steer.core.discovery import discover, load_lexicons
from vla_steer.core.discovery.controls import NeuronStats, matched_controls
from vla_steer.core.discovery.lexicon import token_match_weights
from vla_steer.core.rollouts import open_store
from vla_steer.core.steering import Steerer
from vla_steer.core.tokens import normalize_token
from vla_steer.wire import Client, Observation

ALL_FAST = 40.0  # where every plan of the shipped demo VLA says "fast" (at the demo's 32, some do)


@pytest.fixture(scope="module")
def policy():
    return load_policy(resolve_config("demo_vla", "policies"))  # the shipped config, as `serve` finds it


@pytest.fixture(scope="module")
def directions(policy, tmp_path_factory):
    poles = {k: v for k, v in load_lexicons(shipped("concepts")).items() if k in POLES}
    bb = policy.backbone
    found = discover(bb, poles, index_dir=tmp_path_factory.mktemp("index"), size=SIZE,
                     layers=(1, bb.n_layers - 1), progress=False)  # fmt: skip
    return found, poles


@pytest.fixture(scope="module")
def observations():
    """Frames along a real expert episode (physics and rendering), as the policy node receives them."""
    env = make_env()
    try:
        obs = env.reset(123)
        expert = LiftExpert(SPEEDS["normal"], HEIGHTS["normal"])
        frames = []
        for t in range(40):
            if t % 4 == 0:
                frames.append(
                    Observation(BASELINE_INSTRUCTION, {IMAGE_KEY: obs.images[IMAGE_KEY]}, obs.state)
                )
            obs = env.step(expert.act(obs.ee_pos, np.asarray(env.ground_truth["cube_pos"]))).observation
    finally:
        env.close()
    return frames


def test_bundled_weights_are_small_and_load_through_the_policy_loader(policy):
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    spec = policy.spec
    assert spec.state_dim == 8 and spec.image_keys == {IMAGE_KEY: (64, 64, 3)} and spec.action_dim == 7
    assert policy.backbone.vocab_size > 256 and policy.bins.n_bins == 256


def test_discovery_finds_every_pole_among_the_words_it_was_taught(policy, directions):
    found, poles = directions
    labeler = policy.backbone.labeler
    for name in POLES:
        d = found[name]
        assert len(d.neurons) == SIZE, name
        assert token_match_weights(labeler, poles[name].words).sum() > 0  # the vocabulary has the words
        # The neurons' own top tokens (stored with the direction) are mostly the pole's words.
        hits = [any(normalize_token(t) in poles[name].words for t in n.tokens[:3]) for n in d.neurons]
        assert np.mean(hits) >= 0.5, (name, [n.tokens[:3] for n in d.neurons])


def _speed(policy, frames) -> float:
    return float(np.mean([np.linalg.norm(policy.infer(o).actions[0][:3]) for o in frames]))


def test_steering_moves_the_commanded_speed_the_way_the_direction_says(policy, directions, observations):
    found, _ = directions
    stats = NeuronStats.measure(policy.backbone, lambda: [policy.infer(o) for o in observations])
    concept = {(n.layer, n.index) for d in found.values() for n in d.neurons}
    steerer = Steerer(policy.backbone, positions=POSITIONS)  # as the demo steers
    strength = max(STRENGTHS)
    try:
        base = _speed(policy, observations)
        out, controls = {}, {}
        for name in ("fast", "slow"):
            steerer.add(name, found[name].steer_neurons(), enabled=False)
            with steerer.apply({name: strength}):
                out[name] = _speed(policy, observations)
            for control in matched_controls(found[name], stats, 3, seed=0, exclude=concept):
                steerer.add(control.name, control.steer_neurons(), enabled=False)
                with steerer.apply({control.name: strength}):
                    controls.setdefault(name, []).append(_speed(policy, observations))
        # Fast is the weaker lever of this demo VLA at the demo's strength (it flips about half the plans; in
        # closed loop it misses its demo claim, see the README): the test asks that each direction moves the
        # commanded speed its way, beyond its controls.
        assert out["fast"] > 1.1 * base and out["slow"] < 0.8 * base, (base, out)
        # Matched random neurons move it little, and in the concept's direction far less than the concept
        # (single frames, open loop: the closed-loop figures with CIs are the demo report's).
        for name, sign in (("fast", 1), ("slow", -1)):
            effect = sign * (out[name] / base - 1)
            for speed in controls[name]:
                change = speed / base - 1
                assert abs(change) < 0.15 and sign * change < effect / 3, (name, base, out, controls)
    finally:
        steerer.remove()
    assert _speed(policy, observations) == base  # hooks gone: bit-identical behaviour


def test_the_plan_keeps_its_grammar_and_plan_steering_reaches_only_the_plan(policy, directions, observations):
    """Whatever is steered, the demo VLA says a speed word then a height word; with positions="plan" only
    the forwards that decide those two words are steered, and the action tokens come from unsteered neurons."""
    fast = directions[0]["fast"]
    speeds = {w for ws in SPEED_WORDS.values() for w in ws}
    heights = {w for ws in HEIGHT_WORDS.values() for w in ws}
    neuron = fast.neurons[0]
    clamped: list[
        bool
    ] = []  # per forward: did the first fast neuron hold its clamp value at the last position

    def record(module, args):  # registered after the steerer's hook: sees what down_proj receives
        clamped.append(bool(torch.isclose(args[0][0, -1, neuron.index].abs(), torch.tensor(ALL_FAST))))

    for positions in ("last", "plan"):
        with Steerer(policy.backbone, positions=positions) as steerer:
            steerer.add("fast", fast.steer_neurons(), strength=ALL_FAST)
            hook = policy.backbone.down_proj(neuron.layer).register_forward_pre_hook(record)
            try:
                clamped.clear()
                plans = [policy.infer(o).info["plan"].split() for o in observations]
            finally:
                hook.remove()
        assert all(p[0] in speeds and p[1] in heights for p in plans), plans
        assert all(p[0] in SPEED_WORDS["fast"] for p in plans), plans
        per_inference = [clamped[i : i + 9] for i in range(0, len(clamped), 9)]  # 2 plan words, 7 actions
        expected = [True] * 9 if positions == "last" else [True, True] + [False] * 7
        assert per_inference == [expected] * len(observations), (positions, per_inference)


def test_serve_steers_the_demo_vlas_plan_through_the_installed_command(directions, observations, tmp_path):
    """`vla-steer serve --policy demo_vla`, as the twin's recipe runs it: the node steers the plan by default
    (the demo VLA says one); a steered request changes the plan it answers with, an unsteered one does not."""
    for d in directions[0].values():
        d.save(tmp_path)
    with (
        serving("demo_vla", "--directions", str(tmp_path)) as address,
        Client(address) as client,
    ):
        assert client.hello().info["positions"] == "plan"
        plain = [client.infer(o, steer={}).info["plan"].split() for o in observations]
        fast = [client.infer(o, steer={"fast": ALL_FAST}).info["plan"].split() for o in observations]
    assert all(p[0] in SPEED_WORDS["normal"] for p in plain), plain
    assert all(
        p[0] in SPEED_WORDS["fast"] and p[1] in {w for ws in HEIGHT_WORDS.values() for w in ws} for p in fast
    ), fast


def test_the_demo_grid_runs_each_direction_its_dose_ladder_and_matched_controls():
    grid = settings_grid(("fast", "up"), (4.0, 8.0), controls=2)
    assert grid == [{}, {"fast": 4.0}, {"fast": 8.0}, {"up": 4.0}, {"up": 8.0}, {"fast:random1": 8.0},
                    {"fast:random2": 8.0}, {"up:random1": 8.0}, {"up:random2": 8.0}]  # fmt: skip
    full = settings_grid(("fast",), (4.0, 8.0), controls=1, control_strengths=(4.0, 8.0))
    assert full == [{}, {"fast": 4.0}, {"fast": 8.0}, {"fast:random1": 4.0}, {"fast:random1": 8.0}]


FRAMES = """
import hashlib, json, sys
import numpy as np
from vla_steer.app.demo import data
from vla_steer.app.demo.expert import HEIGHTS, SPEEDS, LiftExpert

if sys.argv[1] == "everything":
    data.DEMO_SIM = data.DEMO_SIM | {"unseen_bodies": [], "draw_collision_geoms": True}
env = data.make_env()
hashes = []
for seed, speed, height in ((3, "fast", "high"), (11, "slow", "low")):
    obs = env.reset(seed)
    expert = LiftExpert(SPEEDS[speed], HEIGHTS[height])
    for _ in range(45):
        hashes.append(hashlib.sha256(obs.images[data.IMAGE_KEY].tobytes()).hexdigest())
        obs = env.step(expert.act(obs.ee_pos, np.asarray(env.ground_truth["cube_pos"]))).observation
env.close()
print(json.dumps(hashes))
"""


@pytest.mark.slow
def test_the_demo_vla_finds_the_cube_in_its_wrist_image_not_in_its_state(policy):
    """One state, the wrist images of 12 differently placed cubes: each first action heads for its own cube.
    (The demo VLA trained by behaviour cloning alone gave the same action for all 12: it drove to where the
    cube usually is and missed the rest.)"""
    env = make_env()
    try:
        scenes = []
        for seed in range(12):
            obs = env.reset(seed)
            scenes.append((obs, np.asarray(env.ground_truth["cube_pos"]) - obs.ee_pos))
    finally:
        env.close()
    state = scenes[0][0].state
    moves = np.array(
        [
            policy.infer(Observation(BASELINE_INSTRUCTION, obs.images, state)).actions[0][:2]
            for obs, _ in scenes
        ]
    )
    offsets = np.array([offset[:2] for _, offset in scenes])
    for axis in (0, 1):  # forward and sideways: the action follows the cube's offset from the gripper
        assert np.corrcoef(moves[:, axis], offsets[:, axis])[0, 1] > 0.8, (axis, moves, offsets)


@pytest.mark.slow
def test_the_geometry_the_demo_leaves_unrendered_is_out_of_the_wrist_cameras_view():
    """The demo's sim skips the arm, its mount and the collision meshes when it renders: every wrist frame of
    two expert episodes (approach, grasp, lift) is the same pixels as with everything drawn."""

    def frames(draw: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", FRAMES, draw], capture_output=True, text=True, timeout=170)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.splitlines()[-1])

    skipped, everything = frames("demo"), frames("everything")
    assert len(skipped) == 90 and len(set(skipped)) > 60  # the camera moves
    assert skipped == everything


def _vla_steer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLA_STEER, *args], capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains a VLA: ~2 min alone on 2 cores, over 3 when the machine is busy
def test_train_demo_generates_demonstrations_and_a_loadable_vla(tmp_path):
    from policies.tiny_vla import TinyVLA

    out = tmp_path / "vla"
    r = _vla_steer(
        "train-demo", "--out", str(out), "--episodes-per-setting", "1", "--ur5e-per-setting", "1", "--steps", "20"
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    data = np.load(tmp_path / "vla_demonstrations.npz")
    assert set(np.unique(data["robot"])) == {0, 1}  # the Panda's and the UR5e twin's demonstrations
    assert set(np.unique(data["speed"])) == {0, 1, 2} and set(np.unique(data["height"])) == {0, 1, 2}
    speed = {k: np.abs(data["actions"][data["speed"] == k][:, :3]).max(1).mean() for k in range(3)}
    assert speed[0] < speed[1] < speed[2]  # slow < normal < fast, as the expert was told
    # The cube's offset from the gripper, which the training-only head reads off the image: at each
    # episode's start the cube lies ahead of and below the gripper (the UR5e starts further back and lower).
    assert data["cube"].shape == (len(data["actions"]), 3)
    first = np.r_[True, np.diff(data["episode"]) != 0]
    for robot, (ahead, below) in enumerate((((0.02, 0.2), (-0.3, -0.1)), ((0.1, 0.35), (-0.2, -0.03)))):
        start = data["cube"][first & (data["robot"] == robot)]
        assert np.all((start[:, 0] > ahead[0]) & (start[:, 0] < ahead[1])), (robot, start)
        assert np.all((start[:, 2] > below[0]) & (start[:, 2] < below[1])), (robot, start)
    vla = TinyVLA.load(out)
    obs = Observation(BASELINE_INSTRUCTION, {IMAGE_KEY: data["images"][0]}, data["states"][0])
    chunk = vla.infer(obs)
    assert chunk.actions.shape == (1, 7) and len(chunk.info["plan"].split()) >= 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_pipeline_end_to_end(tmp_path):
    args = ("demo", "--out", str(tmp_path), "--episodes", "2", "--workers", "2", "--strengths", "8",
            "--controls", "1")  # fmt: skip
    r = _vla_steer(*args)
    assert r.returncode == 0, r.stderr[-4000:]  # claims missed on 2 episodes: reported, exit 0
    assert (
        "4. analysis" in r.stdout and "5. the demo's claims" in r.stdout and "random draws at 8" in r.stdout
    )
    assert yaml.safe_load((tmp_path / "policy.yaml").read_text())["path"] == str(WEIGHTS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = {s["label"] for s in summary["settings"]}
    assert labels == {"baseline"} | {f"{p}=8" for p in POLES} | {f"{p} (random 1)=8" for p in POLES}
    assert all(s["episodes"] == 2 for s in summary["settings"])
    assert set(summary["directions"]) == set(POLES)
    demo = summary["demo"]
    assert demo["command"].startswith("vla-steer demo --out") and demo["reported_strength"] == 8.0
    assert demo["positions"] == POSITIONS == "plan"
    targets = {v["target"] for v in demo["verdicts"]}
    assert {"baseline_success", "fast", "slow_success", "up_controls", "down_specific", "wall_s"} <= targets
    assert demo["all_held"] == all(v["held"] for v in demo["verdicts"])
    for name in POLES:  # each control drawn to match its direction's neurons, the match on record
        match = demo["control_match"][name]
        assert set(match["controls"]) == {f"{name}:random1"} and match["direction"]["value_norm"] > 0
    report = (tmp_path / "report.html").read_text()
    assert "data:image/png" in report and "The demo&#x27;s claims" in report or "The demo's claims" in report
    # --strict turns a missed claim into a failing exit, after the same run (here: too few episodes to hold).
    if not demo["all_held"]:
        r = _vla_steer(*args, "--strict", "--out", str(tmp_path / "strict"))
        assert r.returncode == 1 and "MISSED" in r.stdout, r.stdout[-2000:]
    store = open_store(tmp_path / "rollouts")
    meta = store.episodes()[0].meta
    assert meta["sim"] == "robosuite" and meta["conventions"]["gripper"] == "open_positive"
    assert meta["policy"] == "demo-vla" and "mujoco" in meta["versions"]
    plans = store.to_pandas()["info_plan"].str.split()  # each step: the plan said before its action
    assert plans.map(len).eq(2).all(), plans
