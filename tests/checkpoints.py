"""Tiny checkpoints written in each real layout a user brings (for the command-line tests), and the
robosuite sim config whose cameras and resolution match each one's image keys."""

from __future__ import annotations

from pathlib import Path

from tiny_pi0 import tiny_config, tiny_stats

DEMO = Path(__file__).parents[1] / "policies" / "demo" / "weights"
LAYOUTS = ("demo", "openvla", "pi0_lerobot", "pi0_lerobot_original", "pi0_openpi")
WORDS = ["fast", "quickly", "slow", "slowly", "up", "high", "down", "low", "careful", "gently"]

# policy image key -> robosuite camera, per layout (the policy's own keys; the resolution comes from its hello).
CAMERAS = {
    "demo": {"wrist": "robot0_eye_in_hand"},
    "openvla": {"agentview": "agentview"},
    "pi0_lerobot": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
    "pi0_lerobot_original": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
    "pi0_openpi": {"base_0_rgb": "agentview", "left_wrist_0_rgb": "robot0_eye_in_hand",
                   "right_wrist_0_rgb": "frontview"},
}  # fmt: skip


def write_checkpoint(layout: str, root: Path) -> Path:
    """The checkpoint directory of `layout` under `root` (the demo VLA's is the shipped one)."""
    if layout == "demo":
        return DEMO
    path = root / layout
    if layout == "openvla":
        return _openvla_with_concept_neurons(path)
    from policies.pi0.policy import PI0Policy
    from vla_steer.core import tiny

    tok = tiny.build_tokenizer(vocab_size=512, extra_words=WORDS)
    policy = PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_stats())
    if layout == "pi0_openpi":
        return policy.save(path, layout="openpi")
    return policy.save(path, generation="original" if layout.endswith("original") else "current")


def write_sim_config(layout: str, path: Path) -> Path:
    """A robosuite Lift config for `layout`, with the gripper mapping its policy announces (OpenVLA's [0, 1];
    the sim refuses another) or robosuite's default."""
    cams = ", ".join(f"{k}: {v}" for k, v in CAMERAS[layout].items())
    gripper = "gripper: open_unit\n" if layout == "openvla" else ""
    path.write_text(
        f"kind: robosuite\ntask: Lift\nrobot: Panda\ncameras: {{{cams}}}\nstate: eef_pos_axisangle_gripper\n"
        + gripper
    )
    return path


def _openvla_with_concept_neurons(path: Path) -> Path:
    """A tiny OpenVLA whose neuron 10 (11) of every layer writes "slow" ("up") into the vocabulary, as a
    trained model's concept neurons do; random tiny weights hold none (their top tokens are filler)."""
    import torch

    from policies.openvla import tiny

    model, tok = tiny.build_model(), tiny.build_tokenizer()
    lm = model.language_model
    unembed = lm.get_output_embeddings().weight
    with torch.no_grad():
        for offset, word in enumerate(("slow", "up")):
            (token,) = tok.encode(" " + word, add_special_tokens=False)
            for layer in lm.model.layers:
                column = layer.mlp.down_proj.weight[:, 10 + offset]
                column.copy_(unembed[token] / unembed[token].norm() * column.norm() * 4)
    return tiny.save_checkpoint(path, model, tok)
