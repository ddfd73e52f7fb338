"""The bundled demo VLA: shipped weights, discovery on them, steering that moves the arm, and the pipeline.

Everything here is the real thing: the shipped checkpoint through the policy loader, robosuite physics and
rendering for the observations, the real discovery and Steerer.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml
from support import VLA_STEER

from policies import load_policy
from policies.demo import WEIGHTS
from vla_steer.app.demo.data import IMAGE_KEY, make_env
from vla_steer.app.demo.expert import HEIGHTS, SPEEDS, LiftExpert
from vla_steer.app.demo.language import BASELINE_INSTRUCTION
from vla_steer.app.demo.run import POLES, SIZE, STRENGTHS, random_control
from vla_steer.core.config import resolve_config, shipped
from vla_steer.core.discovery import discover, load_lexicons
from vla_steer.core.discovery.lexicon import token_match_weights
from vla_steer.core.rollouts import open_store
from vla_steer.core.steering import Steerer
from vla_steer.core.tokens import normalize_token
from vla_steer.wire import Observation


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
    steerer = Steerer(policy.backbone)
    try:
        base = _speed(policy, observations)
        out = {}
        for name in ("fast", "slow"):
            steerer.add(name, found[name].steer_neurons(), enabled=False)
            control = random_control(found[name], policy.backbone.d_mlp, seed=0)
            steerer.add(control.name, control.steer_neurons(), enabled=False)
            with steerer.apply({name: STRENGTHS[-1]}):
                out[name] = _speed(policy, observations)
            with steerer.apply({control.name: STRENGTHS[-1]}):
                out[control.name] = _speed(policy, observations)
        assert out["fast"] > 1.25 * base and out["slow"] < 0.8 * base, (base, out)
        # Random neurons of the same number, layers and signs move it far less (single frames, open loop:
        # the closed-loop figures with CIs are the demo report's).
        for name in ("fast", "slow"):
            effect, control = abs(out[name] / base - 1), abs(out[f"{name}:random"] / base - 1)
            assert control < 0.15 and control < effect / 3, (name, base, out)
    finally:
        steerer.remove()
    assert _speed(policy, observations) == base  # hooks gone: bit-identical behaviour


def _vla_steer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLA_STEER, *args], capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains a VLA: ~2 min alone on 2 cores, over 3 when the machine is busy
def test_train_demo_generates_demonstrations_and_a_loadable_vla(tmp_path):
    from policies.tiny_vla import TinyVLA

    out = tmp_path / "vla"
    r = _vla_steer("train-demo", "--out", str(out), "--episodes-per-setting", "1", "--steps", "20")
    assert r.returncode == 0, r.stderr[-4000:]
    data = np.load(tmp_path / "vla_demonstrations.npz")
    assert set(np.unique(data["speed"])) == {0, 1, 2} and set(np.unique(data["height"])) == {0, 1, 2}
    speed = {k: np.abs(data["actions"][data["speed"] == k][:, :3]).max(1).mean() for k in range(3)}
    assert speed[0] < speed[1] < speed[2]  # slow < normal < fast, as the expert was told
    vla = TinyVLA.load(out)
    obs = Observation(BASELINE_INSTRUCTION, {IMAGE_KEY: data["images"][0]}, data["states"][0])
    chunk = vla.infer(obs)
    assert chunk.actions.shape == (1, 7) and len(chunk.info["plan"].split()) >= 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_pipeline_end_to_end(tmp_path):
    r = _vla_steer("demo", "--out", str(tmp_path), "--episodes", "1", "--workers", "2", "--strengths", "16")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "4. analysis" in r.stdout and "random-neuron controls:" in r.stdout
    assert yaml.safe_load((tmp_path / "policy.yaml").read_text())["path"] == str(WEIGHTS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = {s["label"] for s in summary["settings"]}
    assert labels == {"baseline"} | {f"{p}=16" for p in POLES} | {f"{p} (random)=16" for p in POLES}
    assert all(s["episodes"] == 1 for s in summary["settings"])
    assert set(summary["directions"]) == set(POLES)
    assert "data:image/png" in (tmp_path / "report.html").read_text()
    store = open_store(tmp_path / "rollouts")
    meta = store.episodes()[0].meta
    assert meta["sim"] == "robosuite" and meta["conventions"]["gripper"] == "open_positive"
    assert meta["policy"] == "demo-vla" and "mujoco" in meta["versions"]
