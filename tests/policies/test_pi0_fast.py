"""pi0-FAST: the checkpoint layout, loading and its errors, the FAST tokenizer's files, steering at every
prefill position and decoded token. (Equivalence with LeRobot: test_pi0fast_lerobot_equivalence.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from support import VLA_STEER
from tiny_pi0 import make_obs

from policies import load_policy
from policies.pi0_fast.config import read_config
from policies.pi0_fast.fast import FastTokenizer, smooth_chunks
from policies.pi0_fast.tiny import tiny_policy
from policies.resolve import resolve_policy, stack_dims
from vla_steer.core.steering import Steerer


@pytest.fixture(scope="module")
def built():
    return tiny_policy()


@pytest.fixture(scope="module")
def fast_dir(built, tmp_path_factory):
    return built.save(tmp_path_factory.mktemp("ckpt") / "pi0fast")


@pytest.fixture
def policy(fast_dir):
    return load_policy(resolve_policy(fast_dir))


def test_lerobot_layout_on_disk_and_loads_to_the_same_policy(built, fast_dir, policy):
    names = {p.name for p in fast_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "fast_tokenizer"} <= names
    assert any(n.startswith("policy_preprocessor_step_") for n in names)
    config = json.loads((fast_dir / "config.json").read_text())
    assert config["type"] == "pi0_fast" and "vla_steer_architecture" in config
    assert {p.name for p in (fast_dir / "fast_tokenizer").iterdir()} >= {
        "tokenizer.json",
        "processor_config.json",
    }
    obs = make_obs()
    assert built.infer(obs).info["action_tokens"] == policy.infer(obs).info["action_tokens"]
    np.testing.assert_array_equal(built.infer(obs).actions, policy.infer(obs).actions)
    assert stack_dims(resolve_policy(fast_dir)) == {"language": (2, 128)}


def test_image_state_and_instruction_each_change_the_decoded_tokens(policy):
    obs = make_obs()
    base = policy.infer(obs).info["action_tokens"]
    changed = [
        make_obs(seed=1),  # other images and state
        make_obs(instruction="put the bowl on the plate"),
    ]
    for other in changed:
        assert policy.infer(other).info["action_tokens"] != base


def test_prompt_holds_the_discretised_state(policy):
    obs = make_obs()
    text = policy.tokenizer.decode(policy.prompt_ids(obs), skip_special_tokens=True)
    assert text.startswith("Task: pick up the red block, State: ") and text.endswith(";\n")
    bins = [int(b) for b in text.split("State: ")[1].rstrip(";\n").split()]
    assert len(bins) == 8 and all(-1 <= b <= 255 for b in bins)


def test_steering_reaches_every_prefill_position_and_every_decoded_token(policy):
    """One inference = one forward of the steered root; the down_proj hooks see the whole prefix once,
    then each decoded token but the last (the last one is never fed back)."""
    obs = make_obs()
    plain = policy.infer(obs)
    seen: list[int] = []
    down = policy.backbone.down_proj(0)
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    roots: list[int] = []
    root_handle = policy.backbone.root.register_forward_pre_hook(lambda *a: roots.append(1))
    ids = policy.infer(obs).info["action_tokens"]
    handle.remove()
    root_handle.remove()
    n_prefix = 2 * 16 + len(policy.prompt_ids(obs))  # two 32 px cameras of 8 px patches, prompt + BOS
    assert roots == [1]
    assert seen == [n_prefix] + [1] * (len(ids) - 1)

    steerer = Steerer(policy.backbone)
    steerer.add("probe", [(0, 3), (1, 5), (1, 9)], mode="clamp", strength=8.0, enabled=False)
    assert policy.infer(obs).info["action_tokens"] == plain.info["action_tokens"]  # hooked, all off
    with steerer.apply(probe=20.0):
        steered = policy.infer(obs)
    assert steered.info["action_tokens"] != plain.info["action_tokens"]
    steerer.remove()
    np.testing.assert_array_equal(policy.infer(obs).actions, plain.actions)


def test_n_action_steps_option_keeps_the_first_steps_of_the_checkpoints_decode(fast_dir, policy, tmp_path):
    """The FAST tokens are always decoded at the checkpoint's own horizon (an inverse DCT of another
    length would give other actions); the option only cuts the chunk short."""
    obs = make_obs()
    full = policy.infer(obs)
    short = load_policy(resolve_policy(fast_dir, settings={"n_action_steps": 4}))
    assert short.spec.chunk_length == 4
    got = short.infer(obs)
    assert got.info["action_tokens"] == full.info["action_tokens"]
    np.testing.assert_array_equal(got.actions, full.actions[:4])
    with pytest.raises(ValueError, match="keeps 1 to 10"):
        load_policy(resolve_policy(fast_dir, settings={"n_action_steps": 11}))


def test_n_action_steps_different_from_chunk_size_is_warned(fast_dir, tmp_path, caplog):
    copy = shutil.copytree(fast_dir, tmp_path / "short")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"n_action_steps": 5}))
    with caplog.at_level("WARNING", logger="policies.pi0_fast.config"):
        assert read_config(copy / "config.json").n_action_steps == 5
    assert "n_action_steps 5 differs from chunk_size 10" in caplog.text


def test_n_action_steps_option_and_config_errors(fast_dir, tmp_path):
    with pytest.raises(ValueError, match="n_action_steps"):
        resolve_policy(fast_dir, settings={"n_action_steps": 0})
    copy = shutil.copytree(fast_dir, tmp_path / "bad")
    config = json.loads((copy / "config.json").read_text())
    for change, message in (
        ({"temperature": 0.7}, "temperature 0.7"),
        ({"surprise": 1}, "unknown config keys \\['surprise'\\]"),
        ({"n_action_steps": 99}, "exceeds chunk_size"),
    ):
        (copy / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(ValueError, match=message) as e:
            read_config(copy / "config.json")
        assert "config.json" in str(e.value) or "chunk_size" in str(e.value)


def test_a_missing_fast_tokenizer_names_the_option_and_the_option_works(fast_dir, tmp_path):
    copy = shutil.copytree(fast_dir, tmp_path / "nofast")
    moved = shutil.move(copy / "fast_tokenizer", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="action_tokenizer="):
        load_policy(resolve_policy(copy))
    policy = load_policy(resolve_policy(copy, settings={"action_tokenizer": str(moved)}))
    assert policy.infer(make_obs()).actions.shape == (10, 7)


def test_fast_tokenizer_files_are_checked(tmp_path):
    fast = FastTokenizer.fit(smooth_chunks(50, 10, 3), vocab_size=128)
    directory = fast.save(tmp_path / "fast")
    loaded = FastTokenizer.load(directory)
    chunk = smooth_chunks(1, 10, 3, seed=5)[0]
    assert loaded.encode(chunk) == fast.encode(chunk)
    config = json.loads((directory / "processor_config.json").read_text())
    for change, message in (({"scale": 0}, "scale must be > 0"), ({"min_token": "x"}, "min_token must be"),
                            ({"action_dim": -1}, "action_dim must be")):  # fmt: skip
        (directory / "processor_config.json").write_text(json.dumps(config | change))
        with pytest.raises(ValueError, match=message):
            FastTokenizer.load(directory)
    (directory / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        FastTokenizer.load(directory)


def test_undecodable_tokens_give_zero_normalised_actions(policy):
    """A negative FAST id (a word above the FAST range) makes the BPE decode fail: LeRobot's zeros."""
    word_above = policy.actions.last_id + 5
    normed = policy.detokenize([policy.actions.last_id, word_above])
    assert normed.shape == (10, 7) and not normed.any()


@pytest.mark.timeout(120)
def test_serve_refuses_a_missing_fast_tokenizer_before_listening(fast_dir, tmp_path):
    """The installed command: the error names the option, nothing listens."""
    copy = shutil.copytree(fast_dir, tmp_path / "nofast")
    shutil.rmtree(copy / "fast_tokenizer")
    r = subprocess.run([VLA_STEER, "serve", "--policy", str(copy), "--bind", "tcp://127.0.0.1:0"],
                       capture_output=True, text=True, timeout=100, env={**__import__("os").environ,
                                                                          "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode != 0
    assert "action_tokenizer=" in r.stderr and "Traceback" not in r.stderr


def test_model_dtype_follows_the_option(fast_dir):
    policy = load_policy(resolve_policy(fast_dir, dtype="bfloat16"))
    assert policy.model.dtype == torch.bfloat16
    assert policy.infer(make_obs()).actions.dtype == np.float32
