"""Tiny checkpoints written in each real layout a user brings (for the command-line tests), and the
robosuite sim config whose cameras and resolution match each one's image keys."""

from __future__ import annotations

from pathlib import Path

from tiny_pi0 import STATE_CORPUS, tiny_config, tiny_pi05_config, tiny_pi05_stats, tiny_stats

DEMO = Path(__file__).parents[1] / "policies" / "demo" / "weights"
LAYOUTS = (
    "demo",
    "openvla",
    "pi0_lerobot",
    "pi0_lerobot_original",
    "pi0_openpi",
    "pi05_lerobot",
    "pi05_openpi",
    "pi0_fast",
)
WORDS = ["fast", "quickly", "slow", "slowly", "up", "high", "down", "low", "careful", "gently"]

# policy image key -> robosuite camera, per layout (the policy's own keys; the resolution comes from its hello).
CAMERAS = {
    "demo": {"wrist": "robot0_eye_in_hand"},
    "openvla": {"agentview": "agentview"},
    "pi0_lerobot": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
    "pi0_lerobot_original": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
    "pi0_openpi": {"base_0_rgb": "agentview", "left_wrist_0_rgb": "robot0_eye_in_hand",
                   "right_wrist_0_rgb": "frontview"},
    "pi05_lerobot": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
    "pi05_openpi": {"base_0_rgb": "agentview", "left_wrist_0_rgb": "robot0_eye_in_hand",
                    "right_wrist_0_rgb": "frontview"},
    "pi0_fast": {"image": "agentview", "wrist_image": "robot0_eye_in_hand"},
}  # fmt: skip


def write_checkpoint(layout: str, root: Path) -> Path:
    """The checkpoint directory of `layout` under `root` (the demo VLA's is the shipped one)."""
    if layout == "demo":
        return DEMO
    path = root / layout
    if layout == "openvla":
        return _openvla_with_concept_neurons(path)
    if layout == "pi0_fast":
        return _pi0_fast_with_concept_neurons(path)
    from policies.pi0.policy import PI0Policy
    from policies.pi05.policy import PI05Policy
    from vla_steer.core import tiny

    if layout.startswith("pi05"):  # its prompt holds the state as numbers: the tokenizer learns them
        tok = tiny.build_tokenizer(vocab_size=512, extra_words=WORDS, corpus=STATE_CORPUS)
        policy = PI05Policy.build(tiny_pi05_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_pi05_stats())
    else:
        tok = tiny.build_tokenizer(vocab_size=512, extra_words=WORDS)
        policy = PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_stats())
    if layout.endswith("openpi"):
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


def _write_concept_neurons(layers, unembed, tok) -> None:
    """Neuron 10 (11) of every layer writes "slow" ("up") into the vocabulary, as a trained model's concept
    neurons do; random tiny weights hold none (their top tokens are filler)."""
    import torch

    with torch.no_grad():
        for offset, word in enumerate(("slow", "up")):
            (token,) = tok.encode(" " + word, add_special_tokens=False)
            for layer in layers:
                column = layer.mlp.down_proj.weight[:, 10 + offset]
                column.copy_(unembed[token] / unembed[token].norm() * column.norm() * 4)


def _pi0_fast_with_concept_neurons(path: Path) -> Path:
    """LeRobot's pi0_fast layout (config.json, model.safetensors, stats processor files, tokenizer,
    fast_tokenizer/), with concept neurons."""
    import torch

    from policies.pi0_fast.tiny import tiny_policy

    policy = tiny_policy(extra_words=tuple(WORDS))
    pg, tok = policy.model.paligemma, policy.tokenizer
    unembed = pg.lm_head.weight
    with torch.no_grad():  # as long as the (boosted) FAST rows, as a trained model's common words are
        longest = unembed[policy.actions.first_id : policy.actions.last_id + 1].norm(dim=1).max()
        for word in ("slow", "up"):
            (token,) = tok.encode(" " + word, add_special_tokens=False)
            assert not policy.actions.contains(token), f"{word!r} is a FAST id in the tiny vocabulary"
            unembed[token] *= 2 * longest / unembed[token].norm()
    _write_concept_neurons(pg.model.language_model.layers, unembed, tok)
    return policy.save(path)


def _openvla_with_concept_neurons(path: Path) -> Path:
    """A tiny OpenVLA with concept neurons (`_write_concept_neurons`)."""
    from policies.openvla import tiny

    model, tok = tiny.build_model(), tiny.build_tokenizer()
    lm = model.language_model
    _write_concept_neurons(lm.model.layers, lm.get_output_embeddings().weight, tok)
    return tiny.save_checkpoint(path, model, tok)
