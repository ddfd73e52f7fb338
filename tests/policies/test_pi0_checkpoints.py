"""pi0 checkpoints as LeRobot writes them beyond the plain case: fine-tuned (untied embeddings), relative
actions, cameras at another resolution, and every config key honoured or refused. The rules are LeRobot's
(src/lerobot/policies/pi0, processor/relative_action_processor.py, policies/common/vla_utils.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_pi0 import make_obs, noise_of, tiny_config, tiny_stats

from policies.pi0 import checkpoint as ckpt
from policies.pi0.config import Feature, read_config
from policies.pi0.inputs import resize_with_pad
from policies.pi0.policy import PI0Policy
from vla_steer.core import tiny
from vla_steer.wire import Observation


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"])


def build(tok, **cfg_changes) -> PI0Policy:
    cfg = dataclasses.replace(tiny_config(vocab_size=len(tok)), **cfg_changes)
    return PI0Policy.build(cfg, tok, seed=0, stats=tiny_stats())


def test_a_fine_tune_with_untied_embeddings_loads_and_runs_the_files_embed_tokens(tok, tmp_path):
    policy = build(tok)
    pg = policy.model.paligemma_with_expert.paligemma
    base = pg.lm_head.weight.detach().clone()
    pg.lm_head.weight = torch.nn.Parameter(base.clone())  # LeRobot's separate copy
    with torch.no_grad():  # "training" changes embed_tokens only
        pg.model.language_model.embed_tokens.weight.add_(0.05 * torch.randn_like(base))
    want = policy.infer(make_obs(), noise=noise_of(1)).actions
    path = policy.save(tmp_path)
    with safe_open(str(path / ckpt.WEIGHTS), "pt") as f:
        head, embed = f.get_tensor("model." + ckpt.LM_HEAD), f.get_tensor("model." + ckpt.EMBED)
    assert not torch.equal(head, embed)  # the layout of a LeRobot fine-tune

    loaded = PI0Policy.load(path)
    lpg = loaded.model.paligemma_with_expert.paligemma
    assert torch.equal(lpg.model.language_model.embed_tokens.weight, embed)
    assert torch.equal(lpg.lm_head.weight, base)  # the unembedding discovery projects onto
    np.testing.assert_array_equal(loaded.infer(make_obs(), noise=noise_of(1)).actions, want)
    # and a different prompt embedding than the base would give: the fine-tune is really used
    untouched = build(tok).infer(make_obs(), noise=noise_of(1)).actions
    assert not np.allclose(untouched, want)


@pytest.mark.parametrize(
    ("names", "exclude", "mask"),
    [
        (None, ["gripper"], (True,) * 7),  # no names: every dim relative (LeRobot's rule)
        ([f"j{i}" for i in range(6)] + ["Gripper"], ["gripper"], (True,) * 6 + (False,)),
        ([f"j{i}" for i in range(7)], [], (True,) * 7),
    ],
)
def test_relative_actions_add_the_raw_state_back(tok, tmp_path, names, exclude, mask):
    config = {**tiny_config(vocab_size=len(tok)).to_lerobot_dict(), "use_relative_actions": True,
              "relative_exclude_joints": exclude, "action_feature_names": names}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path / "config.json").relative_mask == mask

    absolute = build(tok)
    relative = build(tok, relative_actions=True, relative_mask=mask)
    obs = make_obs()
    got = relative.infer(obs, noise=noise_of(2)).actions
    want = absolute.infer(obs, noise=noise_of(2)).actions + obs.state[:7] * np.array(mask, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    loaded = PI0Policy.load(relative.save(tmp_path / "saved"))
    assert loaded.cfg.relative_actions and loaded.cfg.relative_mask == mask
    np.testing.assert_array_equal(loaded.infer(obs, noise=noise_of(2)).actions, got)


def test_relative_actions_without_enough_state_are_refused(tok):
    with pytest.raises(ValueError, match="use_relative_actions needs a STATE"):
        build(tok, relative_actions=True, relative_mask=(True,) * 7, state=None)


def test_resize_with_pad_keeps_the_aspect_ratio_on_black():
    tall = torch.rand(1, 3, 64, 32)
    out = resize_with_pad(tall, 32, 32)
    assert out.shape == (1, 3, 32, 32)
    assert torch.all(out[..., :8] == 0) and torch.all(out[..., 24:] == 0)  # 16 wide, centred
    inner = torch.nn.functional.interpolate(tall, size=(32, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 8:24], inner.clamp(0, 1), rtol=0, atol=0)
    square = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        resize_with_pad(square, 32, 32),
        torch.nn.functional.interpolate(square, size=(32, 32), mode="bilinear", align_corners=False),
    )


def test_a_camera_at_another_resolution_is_resized_not_refused(tok, tmp_path):
    images = [Feature("observation.images.image", "VISUAL", (3, 48, 48)),
              Feature("observation.images.wrist_image", "VISUAL", (3, 48, 48))]  # fmt: skip
    policy = build(tok, images=images)
    loaded = PI0Policy.load(policy.save(tmp_path))
    assert loaded.spec.image_keys == {"image": (48, 48, 3), "wrist_image": (48, 48, 3)}
    rng = np.random.default_rng(0)
    big = {k: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for k in ("image", "wrist_image")}
    obs = Observation("pick up the red block", big, make_obs().state)
    inputs = loaded.model_inputs(obs, noise_of(1))
    for img, key in zip(inputs["images"], ("image", "wrist_image"), strict=True):
        x = torch.tensor(big[key], dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(img, small.clamp(0, 1) * 2 - 1)
    assert loaded.infer(obs, noise=noise_of(1)).actions.shape == (4, 7)


def test_empty_cameras_are_blank_and_masked(tok, tmp_path):
    policy = build(tok)
    path = policy.save(tmp_path)
    config = json.loads((path / "config.json").read_text()) | {"empty_cameras": 1}
    (path / "config.json").write_text(json.dumps(config))
    loaded = PI0Policy.load(path)
    inputs = loaded.model_inputs(make_obs(), noise_of(1))
    assert len(inputs["images"]) == 3 and [bool(m) for m in inputs["image_masks"]] == [True, True, False]
    assert torch.all(inputs["images"][2] == -1)
    assert set(loaded.spec.image_keys) == {"image", "wrist_image"}  # nothing extra asked of the sim


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frobnicate": 1}, r"unknown config keys \['frobnicate'\]"),
        ({"adapt_to_pi_aloha": True}, "adapt_to_pi_aloha=true"),
        ({"rtc_config": {"enabled": True}}, "real-time chunking"),
        ({"n_obs_steps": 2}, "n_obs_steps is 2"),
        ({"dtype": "float16"}, "dtype 'float16'"),
        ({"proj_width": 999}, "proj_width 999 differs"),
    ],
)
def test_config_keys_are_honoured_or_refused(tok, tmp_path, change, message):
    base = tiny_config(vocab_size=len(tok)).to_lerobot_dict()
    (tmp_path / "config.json").write_text(json.dumps(base | change))
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path / "config.json")


def test_training_keys_are_accepted_and_dtype_is_honoured(tok, tmp_path):
    path = build(tok).save(tmp_path)
    training = {"optimizer_lr": 1e-4, "scheduler_decay_steps": 10, "freeze_vision_encoder": True,
                "compile_model": False, "push_to_hub": False, "dtype": "bfloat16"}  # fmt: skip
    config = json.loads((path / "config.json").read_text()) | training
    (path / "config.json").write_text(json.dumps(config))
    assert PI0Policy.load(path).model.dtype == torch.bfloat16
    assert PI0Policy.load(path, dtype="float32").model.dtype == torch.float32  # a load option wins


def test_openpi_dims_come_from_its_norm_stats(tok, tmp_path):
    path = build(tok).save(tmp_path, layout="openpi")
    assert ckpt.openpi_dims(path) == (8, 7)
    loaded = PI0Policy.load(path)
    assert (loaded.cfg.state_dim, loaded.cfg.action_dim) == (8, 7)
    assert set(loaded.spec.image_keys) == {"base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"}
    stats = tiny_stats()
    assert loaded.action_norm.stats["mean"].tolist() == pytest.approx(stats["action"]["mean"].tolist())
