"""This project's pi0.5 against LeRobot 0.6.1's own: tiny checkpoints that LeRobot's `save_pretrained` wrote,
and what LeRobot's processors and model computed from fixed inputs and noise (tests/data/lerobot_pi05/, made
by scripts/lerobot_pi05_reference.py in a side environment): the prompt tokens (state bins included), the
prefix embeddings, every layer's prefix keys and values, the velocity of the first flow step, and the
actions. Each checkpoint is loaded the way a user's is, through `policies.resolve` and `load_policy`.

Tolerances (fp32 on the CPU both sides, another torch there, attention and loops written differently):
measured at most 0 on the embeddings, 9e-7 on keys/values, 1.2e-7 on the velocity (of magnitude ~1) and
3.8e-6 on actions (of magnitude up to 50, through quantile or std un-normalisation and the state added
back); the bounds below leave room for summation order, and a real mismatch (a missed adaptive norm, gate
or residual, the wrong bin, the state token pi0 has) moves these by 1e-2 or more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from support import VLA_STEER

from policies import load_policy
from policies.resolve import resolve_policy
from vla_steer.wire import Observation

DATA = Path(__file__).parents[1] / "data" / "lerobot_pi05"
CASES = ("plain", "meanstd_relative_finetuned")
ATOL_INTERNAL, ATOL_ACTIONS = 1e-5, 5e-5


def reference(case: str) -> tuple[Observation, dict, dict]:
    ref = load_file(str(DATA / case / "reference.safetensors"))
    meta = json.loads((DATA / case / "reference.json").read_text())
    images = {k.removeprefix("image."): v for k, v in ref.items() if k.startswith("image.")}
    return Observation(meta["instruction"], images, ref["state"]), ref, meta


def load(path: Path):
    return load_policy(resolve_policy(path, n_action_steps=6))


@pytest.mark.parametrize("case", CASES)
def test_prompt_and_intermediates_match_lerobots_own_pi05(case):
    obs, ref, _ = reference(case)
    policy = load(DATA / case)
    assert policy.cfg.variant == "pi05"
    ids = policy.prompt_ids(obs.instruction, policy.normalized_state(obs))
    n = int(ref["token_mask"].sum())
    assert ids == ref["tokens"][:n].tolist()  # BOS + "Task: ..., State: <bins>;\nAction: "
    assert (ref["tokens"][n:] == policy.tokenizer.pad_token_id).all()

    model = policy.model
    inputs = policy.model_inputs(obs, ref["noise"])
    with torch.no_grad():
        prefix = model.embed_prefix(
            inputs["images"], inputs["image_masks"], inputs["tokens"], inputs["token_mask"]
        )
        np.testing.assert_allclose(prefix[0][0].numpy(), ref["prefix_embs"], rtol=0, atol=ATOL_INTERNAL)
        cache = model.fill_prefix_cache(*prefix)
        assert len(cache.keys) == 2
        for i, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            np.testing.assert_allclose(k[0].numpy(), ref[f"keys.{i}"], rtol=0, atol=ATOL_INTERNAL)
            np.testing.assert_allclose(v[0].numpy(), ref[f"values.{i}"], rtol=0, atol=ATOL_INTERNAL)
        assert float(ref["time"]) == 1.0
        velocity = model.denoise_step(cache, None, inputs["noise"], torch.ones(1))
        np.testing.assert_allclose(velocity[0].numpy(), ref["velocity"], rtol=0, atol=ATOL_INTERNAL)


@pytest.mark.parametrize("case", CASES)
def test_actions_match_lerobots_own_pi05(case):
    obs, ref, _ = reference(case)
    got = load(DATA / case).infer(obs, noise=ref["noise"]).actions
    assert got.shape == ref["actions"].shape == (6, 7)
    np.testing.assert_allclose(got, ref["actions"], rtol=0, atol=ATOL_ACTIONS)


def test_each_case_exercises_what_it_names():
    """The cases differ by far more than the tolerance, and their state spans the bin range's ends."""
    (_, plain, pm), (_, other, om) = reference("plain"), reference("meanstd_relative_finetuned")
    assert pm["normalization"] == "QUANTILES" and om["normalization"] == "MEAN_STD"
    assert om["use_relative_actions"] and om["untied_embeddings"]
    assert np.abs(plain["actions"] - other["actions"]).max() > 200 * ATOL_ACTIONS
    for meta in (pm, om):  # a state below the range (bin -1) and at its top (255)
        assert "State: -1 255 " in meta["prompt"]


def test_without_the_adaptive_norms_lerobots_velocity_is_not_reproduced(tmp_path):
    """Zero the expert's norm modulation (a plain, ungated norm then): the reference is missed by far."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    copy = Path(shutil.copytree(DATA / "plain", tmp_path / "plain"))
    weights = load_torch(str(copy / "model.safetensors"))
    for key in [k for k in weights if ".dense." in k]:
        weights[key] = torch.zeros_like(weights[key])
    save_file(weights, str(copy / "model.safetensors"))
    obs, ref, _ = reference("plain")
    got = load(copy).infer(obs, noise=ref["noise"]).actions
    assert np.abs(got - ref["actions"]).max() > 200 * ATOL_ACTIONS


def test_discover_takes_a_lerobot_pi05_fine_tune_as_a_user_would(tmp_path):
    """`vla-steer discover <the LeRobot-written pi0.5 fine-tune>`: the installed command, in a subprocess."""
    out = tmp_path / "directions"
    r = subprocess.run([VLA_STEER, "discover", str(DATA / "meanstd_relative_finetuned"), "--out", str(out)],
                       capture_output=True, text=True, timeout=170)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "steerable stacks of this pi05:" in r.stdout
    assert "wrote" in r.stdout and any(out.iterdir())
