"""LIBERO evaluation profiles: our env-side transforms against each reference's own code, and the refusal of a
policy whose announced conventions contradict the profile.

The reference outputs in tests/data/libero_profiles/ were computed by the reference code itself
(`scripts/libero_profile_reference.py`: TensorFlow and openpi-client in a side venv, LeRobot 0.6.1 in its own);
the inputs are rebuilt here by that script's `scene`. Tolerances, and why:
- OpenVLA's lanczos3 resize alone: within 1 grey level at under 0.1% of pixels (float rounding at x.5).
- OpenVLA's JPEG round trip + lanczos3: the JPEG bytes are identical (PIL and TF both encode with libjpeg's
  defaults at quality 95, 4:2:0), but TF decodes with libjpeg's fast integer IDCT (INTEGER_FAST, its default)
  and PIL only offers the accurate one: measured mean 1.06 and max 8 grey levels; bound at mean 1.5, max 12.
- OpenVLA's centre crop (the policy's, TF crop_and_resize): within 1 grey level.
- openpi's resize_with_pad (PIL bilinear): exact. LeRobot's (torch bilinear on floats): within 0.5 grey
  levels of its float image (the wire carries uint8).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from policies.openvla.processing import center_crop
from policies.pi0.policy import absolute_actions
from sim.base import to_osc_action
from sim.conventions import ConventionMismatch, check_policy
from sim.libero_env import SETTLE_ACTION, TASK_KEYS, LiberoConfig, load_libero_config, profile_names
from sim.libero_profile import process_image

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "libero_profiles"

_spec = importlib.util.spec_from_file_location("reference", ROOT / "scripts" / "libero_profile_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def ref(part: str) -> dict[str, np.ndarray]:
    return dict(np.load(DATA / f"{part}.npz"))


def chain(cfg: LiberoConfig, raw: np.ndarray, size=(224, 224)) -> np.ndarray:
    """The env's image chain on a raw renderer frame (bottom row first), as LiberoEnv applies it."""
    return process_image(raw[::-1], size, rotate=cfg.rotate_images_180, jpeg_quality=cfg.jpeg_quality,
                         resize=cfg.resize)  # fmt: skip


def profile(name: str) -> LiberoConfig:
    return load_libero_config(name, suite="libero_spatial")


# -- the shipped profiles ----------------------------------------------------------------------------


def test_every_family_has_a_profile_that_cites_its_reference():
    assert profile_names() == [
        "lerobot_pi05_libero", "lerobot_pi0_libero", "openpi_pi05_libero", "openpi_pi0_libero", "openvla_libero",
    ]  # fmt: skip
    for name in profile_names():
        cfg = profile(name)
        assert cfg.profile == name and cfg.reference and cfg.settle_steps == 10 and cfg.render_size
        assert cfg.expect["family"] in ("openvla", "pi0", "pi05")
        conv = cfg.conventions()
        assert conv["profile"] == name and json.dumps(conv)
    ov, op, lr = profile("openvla_libero"), profile("openpi_pi0_libero"), profile("lerobot_pi0_libero")
    assert (ov.seeding, ov.env_seed, ov.first_seed, ov.execute_steps) == ("once_per_task", 0, 0, 1)
    assert (op.seeding, op.env_seed, op.first_seed, op.execute_steps) == ("once_per_task", 7, 0, 5)
    assert (lr.seeding, lr.first_seed, lr.execute_steps, lr.step_limit()) == ("per_episode", 1000, None, 280)
    assert ov.step_limit() == op.step_limit() == 220
    assert load_libero_config("openvla_libero", suite="libero_10").step_limit() == 520


def test_profiles_combine_with_sim_configs_and_refuse_overrides(tmp_path):
    cfg = load_libero_config("libero_goal", profile="openpi_pi0_libero", task_id=3)
    assert (cfg.suite, cfg.task_id, cfg.profile, cfg.execute_steps) == (
        "libero_goal",
        3,
        "openpi_pi0_libero",
        5,
    )
    clash = tmp_path / "clash.yaml"
    clash.write_text("suite: libero_10\nprofile: openvla_libero\ngripper: close_positive\n")
    with pytest.raises(ValueError, match=r"\['gripper'\] are set by profile 'openvla_libero' too"):
        load_libero_config(clash)
    with pytest.raises(ValueError, match="name the suite"):
        load_libero_config("openvla_libero")
    with pytest.raises(FileNotFoundError, match="nor a profile"):
        load_libero_config("openvla_libro")
    bad = tmp_path / "bad_profile.yaml"
    bad.write_text("suite_size: 3\nresize: tf_lanczos3\n")  # a profile (no suite): resize needs render_size
    with pytest.raises(ValueError, match="suite_size"):
        load_libero_config(bad, suite="libero_10")
    assert not set(TASK_KEYS) & set(reference.__dict__)  # (sanity: names, not settings)


# -- images: each profile's chain against its reference -----------------------------------------------


def test_openvla_images_match_tf_jpeg_lanczos_and_crop():
    d = ref("openvla")
    raw = reference.scene(256, 256)
    assert int(raw.astype(np.int64).sum()) == int(d["render_sum"])  # the same input as the generator's
    cfg = profile("openvla_libero")
    lanczos = process_image(raw[::-1], (224, 224), rotate=True, jpeg_quality=None, resize="tf_lanczos3")
    diff = np.abs(lanczos.astype(int) - d["lanczos_only"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    ours = chain(cfg, raw)
    diff = np.abs(ours.astype(int) - d["resized"].astype(int))
    assert ours.shape == (224, 224, 3) and diff.max() <= 12 and diff.mean() < 1.5
    crop = np.abs(center_crop(d["resized"]).astype(int) - d["cropped"].astype(int))
    assert crop.max() <= 1
    # Without the chain (straight 224 renders) the images are measurably other ones: the check bites.
    assert np.abs(raw[::-1, ::-1][16:240, 16:240].astype(int) - d["resized"].astype(int)).mean() > 5


def test_openpi_images_match_openpi_client_exactly():
    d = ref("openpi")
    assert int(reference.scene(256, 256).astype(np.int64).sum()) == int(d["render_sum"])
    ours = chain(profile("openpi_pi0_libero"), reference.scene(256, 256))
    assert np.array_equal(ours, d["resized"])
    odd = process_image(reference.scene(100, 180, seed=2), (224, 224), rotate=False, jpeg_quality=None,
                        resize="pil_bilinear_pad")  # fmt: skip
    assert np.array_equal(odd, d["odd_resized"])  # aspect kept, centred black padding


def test_lerobot_images_match_resize_with_pad_torch():
    d = ref("lerobot")
    raw = reference.scene(360, 360)
    assert int(raw.astype(np.int64).sum()) == int(d["render_sum"])
    ours = chain(profile("lerobot_pi0_libero"), raw)
    assert (
        np.abs(ours / 255.0 - d["resized"] / 65535.0).max() * 255 <= 0.51
    )  # 0.5 + the reference's 16-bit storage
    odd = reference.scene(100, 180, seed=2)  # LeRobot flips, then resizes with padding
    ours = process_image(odd[::-1], (224, 224), rotate=True, jpeg_quality=None, resize="torch_bilinear_pad")
    assert (
        np.abs(ours / 255.0 - d["odd_resized"] / 65535.0).max() * 255 <= 0.51
    )  # 0.5 + the reference's 16-bit storage


# -- actions ------------------------------------------------------------------------------------------


def test_gripper_mapping_equals_each_reference():
    d = ref("openvla")
    cfg = profile("openvla_libero")
    for g, want in zip(d["gripper_in"], d["gripper_out"], strict=True):  # extremes, 0.5 and in between
        got = to_osc_action(np.r_[np.zeros(6), g], cfg.gripper, cfg.binarize_gripper)[6]
        assert got == want, (g, got, want)
    for name in ("openpi_pi0_libero", "lerobot_pi0_libero"):  # env.step(action.tolist()): as returned
        cfg = profile(name)
        for g in (-1.0, -0.3, 0.0, 0.4, 1.0):
            assert to_osc_action(np.r_[np.zeros(6), g], cfg.gripper, cfg.binarize_gripper)[6] == g


def test_relative_actions_are_reconstructed_as_openpi_does():
    d = ref("openpi")
    mask = tuple(profile("openpi_pi0_libero").expect["relative_mask"])
    assert np.allclose(absolute_actions(d["chunk"], d["state"], mask), d["absolute"], atol=1e-6)
    assert not np.allclose(d["chunk"], d["absolute"])  # the state is really added


def test_wait_steps_send_each_references_dummy_action():
    for part in ("openvla", "openpi", "lerobot"):
        assert ref(part)["dummy_action"].tolist() == list(SETTLE_ACTION)


# -- refusal ------------------------------------------------------------------------------------------

OPENVLA = {"family": "openvla", "gripper": "open_unit", "action_frame": "absolute", "relative_mask": None,
           "center_crop": 0.9, "resize": "resize-naive"}  # fmt: skip
PI0_OPENPI = {"family": "pi0", "gripper": None, "action_frame": "absolute", "relative_mask": [True] * 6 + [False],
              "center_crop": None, "resize": "pad_bilinear"}  # fmt: skip


def check(conventions: dict, name: str, chunk: int = 50) -> None:
    cfg = profile(name)
    check_policy(conventions, gripper=cfg.gripper, expect=cfg.expect, profile=cfg.profile,
                 profiles=profile_names(), chunk_length=chunk, execute_steps=cfg.execute_steps)  # fmt: skip


def test_a_contradicting_policy_is_refused_naming_the_setting():
    check(OPENVLA, "openvla_libero", chunk=1)
    check(PI0_OPENPI, "openpi_pi0_libero")
    with pytest.raises(ConventionMismatch) as e:
        check(OPENVLA, "openpi_pi0_libero", chunk=1)
    msg = str(e.value)
    assert "the policy's gripper is 'open_unit'" in msg and "family = 'pi0', it announces 'openvla'" in msg
    assert "executes 5 actions per chunk, but the policy returns chunks of 1" in msg
    with pytest.raises(ConventionMismatch, match="family = 'openvla', it announces 'pi0'"):
        check(PI0_OPENPI, "openvla_libero")
    with pytest.raises(ConventionMismatch, match="center_crop: true"):
        check(OPENVLA | {"center_crop": None}, "openvla_libero", chunk=1)
    with pytest.raises(ConventionMismatch, match="relative_action_dims: 6"):
        check(PI0_OPENPI | {"relative_mask": None}, "openpi_pi0_libero")
    with pytest.raises(ConventionMismatch, match="n_action_steps >= 5"):
        check(PI0_OPENPI, "openpi_pi0_libero", chunk=4)


def test_policies_announce_their_conventions_in_hello(tmp_path):
    """The real policies' hello replies (the tiny checkpoints in their real layouts), through the wire."""
    from checkpoints import write_checkpoint

    from policies import load_policy, read_policy_config
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Client, Server

    openvla_dir = write_checkpoint("openvla", tmp_path)
    yaml_path = tmp_path / "openvla.yaml"
    yaml_path.write_text(f"kind: openvla\npath: {openvla_dir}\nunnorm_key: tiny_suite\n")
    openpi_dir = write_checkpoint("pi0_openpi", tmp_path)
    pi0_yaml = tmp_path / "pi0.yaml"
    pi0_yaml.write_text(
        f"kind: pi0\npath: {openpi_dir}\nrelative_action_dims: 6\nstate_dim: 8\naction_dim: 7\n"
    )
    pi05_yaml = tmp_path / "pi05.yaml"
    pi05_yaml.write_text(f"kind: pi05\npath: {write_checkpoint('pi05_lerobot', tmp_path)}\n")
    pi05 = PI0_OPENPI | {"family": "pi05", "relative_mask": None}
    for path, want in (
        (yaml_path, OPENVLA | {"center_crop": None}),
        (pi0_yaml, PI0_OPENPI),
        (pi05_yaml, pi05),
    ):
        node = PolicyNode(load_policy(read_policy_config(path)), [])
        with Server(node, "tcp://127.0.0.1:0").start() as server, Client(server.address) as client:
            conventions = dict(client.hello().conventions)
        assert {k: conventions.get(k) for k in want} == want, path
    # OpenVLA's centre crop defaults on for LIBERO statistics (the official script's default for them)
    libero_stats = tmp_path / "libero.yaml"
    libero_stats.write_text(
        f"kind: openvla\npath: {openvla_dir}\nunnorm_key: tiny_suite\ncenter_crop: null\n"
    )
    assert load_policy(read_policy_config(libero_stats)).image_processor.center_crop is False
    with pytest.raises(ValueError, match="relative_action_dims is for openpi checkpoints"):
        lerobot = write_checkpoint("pi0_lerobot", tmp_path)
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"kind: pi0\npath: {lerobot}\nrelative_action_dims: 6\n")
        load_policy(read_policy_config(bad))
