"""LeRobot's policy_preprocessor.json / policy_postprocessor.json are read: the rename map is honoured,
settings that disagree with config.json are refused naming the file and key. The checkpoints are the
LeRobot-written fixtures (scripts/lerobot_pi05_reference.py, scripts/lerobot_pi0fast_reference.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import VLA_STEER

from policies.pi0.checkpoint import CheckpointError
from policies.pi0_fast import PI0FastPolicy
from policies.pi05 import PI05Policy

DATA = Path(__file__).parents[1] / "data"
PRE, POST = "policy_preprocessor.json", "policy_postprocessor.json"


def edited(tmp_path, case: str, name: str, change) -> Path:
    copy = shutil.copytree(DATA / case, tmp_path / "ckpt")
    data = json.loads((copy / name).read_text())
    for step in data["steps"]:
        change(step["registry_name"], step["config"])
    (copy / name).write_text(json.dumps(data))
    return copy


def set_in(kind: str, **values):
    return lambda name, config: config.update(values) if name == kind else None


def test_rename_map_gives_the_default_observation_keys(tmp_path):
    renames = {"observation.images.agentview": "observation.images.image", "observation.images.hand":
               "observation.images.wrist_image", "observation.joints": "observation.state"}  # fmt: skip
    path = edited(
        tmp_path, "lerobot_pi05/plain", PRE, set_in("rename_observations_processor", rename_map=renames)
    )
    assert set(PI05Policy.load(path).spec.image_keys) == {"agentview", "hand"}
    # the image_keys option still wins
    policy = PI05Policy.load(path, image_keys={"observation.images.wrist_image": "wrist"})
    assert set(policy.spec.image_keys) == {"agentview", "wrist"}


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (PRE, set_in("rename_observations_processor", rename_map={"a": "observation.images.nope"}),
         r"rename_map renames 'a' to 'observation.images.nope'"),
        (PRE, set_in("normalizer_processor", eps=1e-6), r"normalizer_processor\): eps 1e-06"),
        (POST, set_in("unnormalizer_processor", norm_map={"ACTION": "MEAN_STD"}), r"norm_map.ACTION is 'MEAN_STD'"),
        (PRE, set_in("tokenizer_processor", max_length=64), r"max_length 64 but config.json's tokenizer_max_length"),
    ],
)  # fmt: skip
def test_pi05_settings_that_disagree_with_the_config_are_refused(tmp_path, name, change, message):
    path = edited(tmp_path, "lerobot_pi05/plain", name, change)
    with pytest.raises(ValueError, match=message) as e:
        PI05Policy.load(path)
    assert str(path / name) in str(e.value)


def test_pi0_fast_action_tokenizer_name_and_max_length_are_checked(tmp_path):
    path = edited(tmp_path, "lerobot_pi0fast/plain", PRE,
                  set_in("action_tokenizer_processor", action_tokenizer_name="someone/other-fast"))  # fmt: skip
    with pytest.raises(ValueError, match="action_tokenizer_name 'someone/other-fast'"):
        PI0FastPolicy.load(path)
    shutil.rmtree(path)
    path = edited(tmp_path, "lerobot_pi0fast/plain", PRE, set_in("tokenizer_processor", max_length=7))
    with pytest.raises(ValueError, match="max_length 7"):
        PI0FastPolicy.load(path)


def test_missing_stats_name_the_norm_stats_option(tmp_path):
    """lerobot/pi05_base ships no stats."""
    copy = shutil.copytree(DATA / "lerobot_pi05/plain", tmp_path / "base")
    for f in copy.glob("policy_*processor*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="found none; pass the option norm_stats="):
        PI05Policy.load(copy)


@pytest.mark.timeout(120)
def test_serve_refuses_a_disagreeing_processor_file_before_listening(tmp_path):
    path = edited(tmp_path, "lerobot_pi05/plain", PRE, set_in("normalizer_processor", eps=1e-6))
    r = subprocess.run([VLA_STEER, "serve", "--policy", str(path), "--bind", "tcp://127.0.0.1:0"],
                       capture_output=True, text=True, timeout=100, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode != 0
    assert PRE in r.stderr and "eps 1e-06" in r.stderr and "Traceback" not in r.stderr
