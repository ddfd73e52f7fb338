"""This project's pi0 against LeRobot 0.6.1's own: tiny checkpoints that LeRobot's `save_pretrained` wrote
and actions that LeRobot's processors and `predict_action_chunk` computed from fixed inputs and noise
(tests/data/lerobot_pi0/, made by scripts/lerobot_pi0_reference.py in a side environment). Each is loaded
the way a user's is, through `policies.resolve` and `load_policy`, and run on the same inputs and noise.

Tolerance: 5e-5 absolute on actions of magnitude 0.1-6. Both sides run float32 on the CPU, but in another
torch (2.11 there, the project's here) and with attention, rotary and time embeddings and the flow-matching
loop written differently, so sums are ordered and rounded differently; measured: at most 1.1e-5 in every
case (~2e-6 of the largest action), through the unnormalisation's std of up to 2. A real mismatch (a
missed relative step, the wrong embedding, a resize without padding) moves actions by 1e-2 or more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from support import VLA_STEER

from policies import load_policy
from policies.resolve import resolve_policy
from vla_steer.wire import Observation

DATA = Path(__file__).parents[1] / "data" / "lerobot_pi0"
CASES = ("plain", "finetuned", "relative", "camera256")
ATOL = 5e-5


def reference(case: str) -> tuple[Observation, np.ndarray, np.ndarray, np.ndarray, dict]:
    ref = load_file(str(DATA / case / "reference.safetensors"))
    meta = json.loads((DATA / case / "reference.json").read_text())
    images = {k.removeprefix("image."): v for k, v in ref.items() if k.startswith("image.")}
    obs = Observation(meta["instruction"], images, ref["state"])
    return obs, ref["noise"], ref["actions"], ref["tokens"], meta


@pytest.mark.parametrize("case", CASES)
def test_actions_match_lerobots_own_pi0(case):
    obs, noise, want, tokens, meta = reference(case)
    policy = load_policy(resolve_policy(DATA / case, n_action_steps=want.shape[0]))
    ids = policy.prompt_ids(obs.instruction)  # LeRobot's prompt: BOS + "task\n", padded to 48
    assert tokens[: len(ids)].tolist() == ids
    assert (tokens[len(ids) :] == policy.tokenizer.pad_token_id).all()
    got = policy.infer(obs, noise=noise).actions
    assert got.shape == want.shape == (6, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_each_case_exercises_what_it_names():
    """The references differ where the cases differ, each by far more than the tolerance: the
    equivalence above is not four copies of one easy case."""
    plain = reference("plain")
    for case in ("finetuned", "relative", "camera256"):
        assert np.abs(reference(case)[2] - plain[2]).max() > 200 * ATOL, case
    assert reference("relative")[4]["use_relative_actions"]
    assert reference("finetuned")[4]["untied_embeddings"]
    assert reference("camera256")[0].images["image"].shape == (256, 256, 3)


def test_the_fine_tune_runs_its_own_embed_tokens_not_lm_head(tmp_path):
    """Overwrite the fine-tune's embed_tokens with its lm_head (what tying would load): LeRobot's
    actions are then no longer reproduced."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    copy = Path(shutil.copytree(DATA / "finetuned", tmp_path / "tied"))
    weights = load_torch(str(copy / "model.safetensors"))
    pg = "model.paligemma_with_expert.paligemma."
    weights[pg + "model.language_model.embed_tokens.weight"] = weights[pg + "lm_head.weight"].clone()
    save_file(weights, str(copy / "model.safetensors"))
    obs, noise, want, _, _ = reference("finetuned")
    got = load_policy(resolve_policy(copy, n_action_steps=6)).infer(obs, noise=noise).actions
    assert np.abs(got - want).max() > 200 * ATOL


def test_discover_takes_a_lerobot_fine_tune_as_a_user_would(tmp_path):
    """`vla-steer discover <the LeRobot-written fine-tune>`: the installed command, in a subprocess."""
    out = tmp_path / "directions"
    r = subprocess.run([VLA_STEER, "discover", str(DATA / "finetuned"), "--out", str(out)],
                       capture_output=True, text=True, timeout=170)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and any(out.iterdir())
