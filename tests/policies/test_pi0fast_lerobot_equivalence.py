"""This project's pi0-FAST against LeRobot 0.6.1's own: tiny checkpoints that LeRobot's `save_pretrained`
wrote, FAST processor files fitted by the reference processor class, and what LeRobot's processors and
`predict_action_chunk` computed from fixed inputs (tests/data/lerobot_pi0fast/, made by
scripts/lerobot_pi0fast_reference.py in a side environment). Each checkpoint is loaded the way a user's
is, through `policies.resolve` and `load_policy`.

Tolerances (both sides float32 on the CPU, another torch and transformers there): prefix hidden states
2e-5 and logits 5e-5 absolute (measured: 1.2e-6 and 3.8e-6); decoded tokens and prompt ids equal;
actions 1e-5 (measured: 0, the same tokens decode to the same floats). FAST encodings equal, decodings
1e-9.
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
from policies.pi0_fast.fast import FastTokenizer, smooth_chunks
from policies.pi0_fast.policy import InvalidActionTokens
from policies.resolve import resolve_policy
from vla_steer.wire import Observation

DATA = Path(__file__).parents[1] / "data" / "lerobot_pi0fast"
CASES = ("plain", "relative", "horizon", "stops")
TOKENIZER = json.loads((DATA / "fast_tokenizer.json").read_text())


def reference(case: str) -> tuple[Observation, dict, dict]:
    ref = load_file(str(DATA / case / "reference.safetensors"))
    meta = json.loads((DATA / case / "reference.json").read_text())
    images = {k.removeprefix("image."): v for k, v in ref.items() if k.startswith("image.")}
    return Observation(meta["instruction"], images, ref["state"]), ref, meta


@pytest.fixture(scope="module")
def policies():
    return {case: load_policy(resolve_policy(DATA / case)) for case in CASES}


# -- the FAST tokenizer --------------------------------------------------------------------------------


def test_fast_encodings_and_decodings_match_the_reference_processor():
    fast = FastTokenizer.load(DATA / "plain" / "fast_tokenizer")
    h, d = TOKENIZER["time_horizon"], TOKENIZER["action_dim"]
    for chunk, want, decoded in zip(
        TOKENIZER["chunks"], TOKENIZER["encoded"], TOKENIZER["decoded"], strict=True
    ):
        chunk = np.asarray(chunk, np.float32)
        assert fast.encode(chunk) == want
        np.testing.assert_allclose(fast.decode(want, h, d), decoded, rtol=0, atol=1e-9)
        assert np.abs(fast.decode(want, h, d) - chunk).max() < 0.1  # a round trip, to quantisation


def test_our_fit_trains_the_reference_fits_tokenizer():
    """The reference fitted its processor on smooth_chunks(400, 10, 7, seed=0), scale 10, 192 tokens: our
    `fit` on the same data gives the same alphabet offset and the same encodings."""
    ours = FastTokenizer.fit(smooth_chunks(400, 10, 7, seed=0), scale=10, vocab_size=192)
    theirs = FastTokenizer.load(DATA / "plain" / "fast_tokenizer")
    assert (ours.min_token, ours.n_tokens) == (theirs.min_token, theirs.n_tokens)
    for chunk, want in zip(TOKENIZER["chunks"], TOKENIZER["encoded"], strict=True):
        assert ours.encode(np.asarray(chunk, np.float32)) == want


@pytest.mark.parametrize("name", sorted(TOKENIZER["detokenize"]))
def test_detokenizing_matches_lerobot(policies, name):
    """Valid sequences, "Action: " removed, cut at "|", too short or long, ids outside the FAST range
    (a negative FAST id: zeros, as LeRobot's caught error), an empty sequence."""
    case = TOKENIZER["detokenize"][name]
    assert "raises" not in case, case
    got = policies["plain"].detokenize(case["tokens"])
    np.testing.assert_allclose(got, case["actions"], rtol=0, atol=1e-6)


def test_the_detokenize_cases_differ_where_they_should():
    cases = {k: np.asarray(v["actions"]) for k, v in TOKENIZER["detokenize"].items()}
    for zero in ("above_range", "empty", "newline"):
        assert not cases[zero].any(), zero
    for same in ("action_prefix_and_end", "long", "below_range"):
        np.testing.assert_array_equal(cases[same], cases["valid"])
    assert np.abs(cases["short"] - cases["valid"]).max() > 0.05


# -- the model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_prefix_logits_tokens_and_actions_match_lerobots_own_pi0_fast(policies, case):
    obs, ref, meta = reference(case)
    policy = policies[case]
    ids = policy.prompt_ids(obs)
    assert ids == [*ref["prompt_tokens"].tolist(), policy.tokenizer.bos_token_id]
    with torch.no_grad():
        out = policy.model.prefill(policy.model.embed_prefix(policy.images(obs), torch.tensor([ids])))
    np.testing.assert_allclose(out.last_hidden_state[0].numpy(), ref["prefix_hidden"], rtol=0, atol=2e-5)
    tokens, logits = policy.decode_tokens(obs)
    n = len(tokens)
    assert tokens == ref["decoded"][:n].tolist()
    assert (ref["decoded"][n:] == 0).all()  # LeRobot zero-fills after an early stop
    np.testing.assert_allclose(logits.numpy(), ref["step_logits"][:n], rtol=0, atol=5e-5)
    got = policy.infer(obs)
    assert got.actions.shape == ref["actions"].shape == (meta["n_action_steps"], 7)
    np.testing.assert_allclose(got.actions, ref["actions"], rtol=0, atol=1e-5)
    assert got.info["action_tokens"] == tokens


def test_each_case_exercises_what_it_names():
    plain = reference("plain")[1]["actions"]
    assert np.abs(reference("relative")[1]["actions"] - plain).max() > 0.1
    assert reference("horizon")[1]["actions"].shape == (6, 7)
    stops = reference("stops")
    assert stops[2]["end_marker_decoded"] and not reference("plain")[2]["end_marker_decoded"]
    assert np.abs(stops[1]["actions"] - plain).max() > 0.1


def test_a_checkpoint_that_validates_the_action_prefix_refuses_tokens_without_it(tmp_path):
    """LeRobot asserts the decoded pieces start with "Action", ":" when validate_action_token_prefix is set
    (the tiny random model never writes them): the same checkpoint with the flag on is an error here too."""
    copy = Path(shutil.copytree(DATA / "plain", tmp_path / "validating"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"validate_action_token_prefix": True}))
    obs, _, _ = reference("plain")
    with pytest.raises(InvalidActionTokens, match="validate_action_token_prefix"):
        load_policy(resolve_policy(copy)).infer(obs)


def test_validation_is_lerobots_literal_piece_rule_on_the_prefix_fixture(tmp_path):
    """LeRobot asserts the pieces start with "Action", ":" (the real PaliGemma tokenizer's split). The fixture
    tokenizer splits "Action: " as "▁Action:", "▁", so LeRobot's own assertion refuses the
    `action_prefix_and_end` case with the flag on, and so does this loader; with the flag off it decodes to
    LeRobot's actions (test_detokenizing_matches_lerobot). A positive case needs a fixture tokenizer with
    the real split."""
    copy = Path(shutil.copytree(DATA / "plain", tmp_path / "validating"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"validate_action_token_prefix": True}))
    policy = load_policy(resolve_policy(copy))
    tokens = TOKENIZER["detokenize"]["action_prefix_and_end"]["tokens"]
    assert policy.tokenizer.convert_ids_to_tokens(tokens[:2]) == ["▁Action:", "▁"]
    with pytest.raises(InvalidActionTokens, match="'Action', ':'"):
        policy.detokenize(tokens)


def test_fast_action_tokens_are_labelled_in_the_vocabulary_projection(policies):
    """The language backbone's labeler names FAST ids as action tokens (so discovery skips them as words)
    and leaves the words around them alone."""
    policy = policies["plain"]
    labeler, actions = policy.backbone.labeler, policy.actions
    assert (actions.first_id, actions.last_id) == (382 - 1 - 128 - 191, 382 - 1 - 128)
    assert labeler.label(actions.last_id) == "[FAST 0]"
    assert labeler.label(actions.first_id) == "[FAST 191]"
    assert labeler.word(actions.first_id) is None and labeler.word(actions.last_id) is None
    words = [i for i in range(labeler.size) if labeler.word(i) is not None]
    assert words and not any(actions.contains(i) for i in words)  # below and above the range: words
    assert min(words) < actions.first_id and max(words) > actions.last_id
    assert sum(labeler.special(i) is not None for i in range(labeler.size)) >= 192


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_discover_takes_a_lerobot_pi0_fast_checkpoint_as_a_user_would(tmp_path):
    """`vla-steer discover <LeRobot's pi0_fast>`, the installed command: the projection names the FAST
    tokens (this tiny model's boosted FAST rows top every neuron's list) as action tokens, not words."""
    out = tmp_path / "directions"
    r = subprocess.run([VLA_STEER, "discover", str(DATA / "plain"), "--out", str(out), "--method", "clusters"],
                       capture_output=True, text=True, timeout=170)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and any(out.glob("*.json"))
    assert "[FAST " in r.stdout
