"""`image_keys: {feature: null}`: a declared camera the setup lacks is empty (LeRobot's _preprocess_images:
-1 everywhere, masked out; pi0-FAST leaves it out of the prefix, which computes the same)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_pi0 import make_obs, noise_of, tiny_config, tiny_stats

from policies.pi0.policy import PI0Policy
from policies.pi0_fast import PI0FastPolicy
from policies.pi0_fast.tiny import tiny_policy
from vla_steer.core import tiny

WRIST = "observation.images.wrist_image"


def without_wrist(obs):
    return type(obs)(obs.instruction, {"image": obs.images["image"]}, obs.state)


def declared_empty(path, tmp_path):
    """The same weights, the wrist camera declared as LeRobot's `empty_cameras` (an already tested path)."""
    copy = shutil.copytree(path, tmp_path / "declared_empty")
    config = json.loads((copy / "config.json").read_text())
    del config["input_features"][WRIST]
    (copy / "config.json").write_text(json.dumps(config | {"empty_cameras": 1}))
    return copy


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory):
    tok = tiny.build_tokenizer(vocab_size=512)
    return PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, stats=tiny_stats()).save(
        tmp_path_factory.mktemp("pi0")
    )


def test_pi0_null_camera_is_an_empty_masked_camera(pi0_dir, tmp_path):
    policy = PI0Policy.load(pi0_dir, image_keys={WRIST: None})
    assert policy.n_empty == 1 and set(policy.spec.image_keys) == {"image"}
    obs = make_obs()
    inputs = policy.model_inputs(without_wrist(obs), noise_of(0))
    assert [bool(m) for m in inputs["image_masks"]] == [True, False]
    assert (inputs["images"][1] == -1).all()
    got = policy.infer(without_wrist(obs), noise=noise_of(0)).actions
    want = PI0Policy.load(declared_empty(pi0_dir, tmp_path)).infer(obs, noise=noise_of(0)).actions
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, PI0Policy.load(pi0_dir).infer(obs, noise=noise_of(0)).actions)


def test_pi0_fast_null_camera_is_left_out(tmp_path):
    path = tiny_policy().save(tmp_path / "fast")
    policy = PI0FastPolicy.load(path, image_keys={WRIST: None})
    assert set(policy.spec.image_keys) == {"image"}
    obs = make_obs()
    assert len(policy.images(without_wrist(obs))) == 1
    got = policy.infer(without_wrist(obs))
    want = PI0FastPolicy.load(declared_empty(path, tmp_path)).infer(obs)
    assert got.info["action_tokens"] == want.info["action_tokens"]


def test_a_missing_camera_names_the_option_and_no_camera_at_all_is_refused(pi0_dir):
    with pytest.raises(ValueError, match=r"image_keys: \{observation.images.wrist_image: null\}"):
        PI0Policy.load(pi0_dir).infer(without_wrist(make_obs()))
    with pytest.raises(ValueError, match="leaves no camera"):
        PI0Policy.load(pi0_dir, image_keys={WRIST: None, "observation.images.image": None})
