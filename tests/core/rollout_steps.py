"""Shared by the rollout store's tests: a step with every field, an episode recorded from such steps, and a
bit-exact comparison of what was read back with what was written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vla_steer.core.rollouts import Episode, Recorder

STEER = {"fast": {"mode": "clamp", "strength": 4.0, "enabled": True, "layers": [15, 16]}}


def make_step(i: int, rng: np.random.Generator, *, cams=("agentview", "wrist"), ee_vel_dim: int = 3) -> dict:
    """Every field, with values derived from `i` so any step can be checked on its own. (`ee_vel_dim=6`: the
    layout stores had before the velocity convention became linear only.)"""
    return {
        "images": {c: rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for c in cams},
        "state": rng.standard_normal(8),
        "ee_pos": rng.standard_normal(3).astype(np.float32),
        "ee_quat": rng.standard_normal(4),
        "ee_vel": rng.standard_normal(ee_vel_dim),
        "action_chunk": rng.standard_normal((5, 7)).astype(np.float32),
        "action": rng.standard_normal(7).astype(np.float32),
        "reward": float(i) * 0.5,
        "t_wall": 1_700_000_000.0 + i * 0.1,
        "t_sim": i * 0.05,
        "steering": {"fast": {**STEER["fast"], "strength": float(i)}},
        "policy_info": {"plan": ["normal middle", "fast high"][i % 2], "policy_ms": 10.0 + i},
        "activations": {
            "fast": rng.standard_normal(12).astype(np.float32),
            "layer:15": rng.standard_normal((2, 3)).astype(np.float32),
        },
    }


def record(
    root: Path, n_steps: int, seed: int, *, end: bool = True, cams=("agentview", "wrist"), **meta
) -> tuple[str, list[dict]]:
    rng = np.random.default_rng(seed)
    ep = Recorder(root).start_episode({"task": "libero_10/0", "instruction": "put the bowl away", **meta})
    steps = [make_step(i, rng, cams=cams) for i in range(n_steps)]
    for i, s in enumerate(steps):
        ep.step(**s)
        if i == 1:
            ep.event("knobs", t=123.0, op="set", strengths={"fast": 8.0})
    if end:
        ep.end(success=bool(seed % 2), final_note="done")
    return ep.id, steps


def assert_steps_equal(ep: Episode, steps: list[dict]) -> None:
    """Bit-exact: dtypes kept, values equal (no float round trip through text or casts)."""
    assert ep.n_steps == len(steps)
    if not steps:
        assert ep.arrays == {} and ep.images == {} and ep.steering == [] and ep.policy_info == []
        return
    for name in ("state", "ee_pos", "ee_quat", "ee_vel", "action_chunk", "action"):
        want = np.stack([s[name] for s in steps])
        assert ep.arrays[name].dtype == want.dtype, name
        np.testing.assert_array_equal(ep.arrays[name], want)
    for name in ("reward", "t_wall", "t_sim"):
        np.testing.assert_array_equal(ep.arrays[name], [s[name] for s in steps])
    for cam in steps[0]["images"]:
        np.testing.assert_array_equal(ep.images[cam], np.stack([s["images"][cam] for s in steps]))
    for name in steps[0]["activations"]:
        np.testing.assert_array_equal(ep.activations[name], np.stack([s["activations"][name] for s in steps]))
    assert ep.steering == [s["steering"] for s in steps]
    assert ep.policy_info == [s.get("policy_info") for s in steps]
