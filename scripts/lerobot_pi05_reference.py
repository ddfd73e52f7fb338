"""Tiny pi0.5 checkpoints written, and run, by LeRobot 0.6's own code: the reference that
tests/policies/test_pi05_lerobot_equivalence.py holds this project's pi0.5 to.

Runs in the side environment of scripts/lerobot_pi0_reference.py (Python 3.12, `lerobot[pi]==0.6.1`):

    PYTHONPATH=. /tmp/lerobot-venv/bin/python scripts/lerobot_pi05_reference.py   # -> tests/data/lerobot_pi05/

Per case, tests/data/lerobot_pi05/<case>/ holds what LeRobot's `save_pretrained` wrote (config.json,
model.safetensors, the pre/post-processor files with the normalisation stats), the tokenizer, and
reference.safetensors + reference.json: the inputs, the noise, LeRobot's intermediates (the prefix
embeddings, the prefix key/value cache of every layer, the velocity of the first flow step, all at the
prefix's valid positions) and the actions its processors and `predict_action_chunk` produced.

What is patched, and only to make the model tiny, is what the pi0 generator patches, with its code (the
Gemma variants, the SigLIP tower, the vocabulary, the tokenizer; the sizes are its sizes); the tokenizer is also trained on numbers, because pi0.5
writes the discretised state into the prompt. Intermediates are read by wrapping LeRobot's own methods
(their results are recorded, never changed).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lerobot
import numpy as np
import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.pi05 import modeling_pi05, processor_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy
from lerobot_pi0_reference import (
    ACTION_DIM,
    CHUNK,
    INSTRUCTION,
    MAX_ACTION,
    MAX_STATE,
    STATE_DIM,
    VISION,
    save_checkpoint,
    tiny_sizes,
    tiny_tokenizer,
)
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "lerobot_pi05"
# What the state bins are written with: every bin number, and the prompt's frame.
STATE_CORPUS = (" ".join(str(i) for i in range(-1, 256)), "Task: the cube, State: 1 2 3;\nAction: ")
# case -> (normalisation of state and actions, use_relative_actions, untie and fine-tune the embeddings)
CASES = {
    "plain": ("QUANTILES", False, False),  # pi0.5's default
    "meanstd_relative_finetuned": ("MEAN_STD", True, True),
}


def record_intermediates(model) -> dict:
    """Wrap the model's prefix embedding, prefix pass and denoising step; their first results land in
    the returned dict."""
    seen: dict = {}

    def embed_prefix(real, *args):
        out = real(*args)
        seen.setdefault("prefix_embs", out[0][0])
        seen.setdefault("prefix_pad", out[1][0])
        return out

    def pwe_forward(real, **kw):
        out = real(**kw)
        if kw["inputs_embeds"][1] is None and "keys" not in seen:  # the prefix pass: its cache
            cache = out[1]
            seen["keys"] = [layer.keys[0].clone() for layer in cache.layers]
            seen["values"] = [layer.values[0].clone() for layer in cache.layers]
        return out

    def denoise_step(real, **kw):
        out = real(**kw)
        seen.setdefault("velocity", out[0].clone())
        seen.setdefault("time", kw["timestep"][0].clone())
        return out

    model.embed_prefix = functools.partial(embed_prefix, model.embed_prefix)
    pwe = model.paligemma_with_expert
    pwe.forward = functools.partial(pwe_forward, pwe.forward)
    model.denoise_step = functools.partial(denoise_step, model.denoise_step)
    return seen


def build_case(name: str, norm: str, relative: bool, untie: bool, tok) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size = VISION["image_size"]
    images = {f"observation.images.{k}": PolicyFeature(FeatureType.VISUAL, (3, size, size))
              for k in ("image", "wrist_image")}  # fmt: skip
    names = [f"joint_{i}" for i in range(ACTION_DIM - 1)] + ["gripper"]
    mode = NormalizationMode[norm]
    config = PI05Config(
        input_features={**images, "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        chunk_size=CHUNK,
        n_action_steps=4,
        max_state_dim=MAX_STATE,
        max_action_dim=MAX_ACTION,
        num_inference_steps=3,
        image_resolution=(size, size),
        use_relative_actions=relative,
        action_feature_names=names if relative else None,
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": mode, "ACTION": mode},
        device="cpu",
        push_to_hub=False,
    )
    policy = PI05Policy(config)
    pg = policy.model.paligemma_with_expert.paligemma
    with torch.no_grad():  # random tiny weights give near-zero outputs: spread them so differences show
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        # adaRMS modulation is zero-initialised; give it weight so the time conditioning matters
        for n, p in policy.named_parameters():
            if ".dense." in n:
                p.add_(0.2 * torch.randn_like(p))
        embed = pg.model.language_model.embed_tokens.weight
        pg.lm_head.weight.copy_(embed)  # a released base checkpoint: PaliGemma's tied pair, equal
        if untie:  # what LeRobot's fine-tuning leaves: its separate lm_head as loaded, embed_tokens trained
            embed.add_(0.05 * torch.randn_like(embed))
    lo_s, lo_a = rng.normal(size=STATE_DIM) - 1.5, rng.normal(size=ACTION_DIM) - 1.0
    stats = {
        "observation.state": {"mean": rng.normal(size=STATE_DIM), "std": rng.uniform(0.5, 2.0, STATE_DIM),
                              "q01": lo_s, "q99": lo_s + rng.uniform(2.0, 4.0, STATE_DIM)},
        "action": {"mean": rng.normal(size=ACTION_DIM), "std": rng.uniform(0.5, 2.0, ACTION_DIM),
                   "q01": lo_a, "q99": lo_a + rng.uniform(1.0, 3.0, ACTION_DIM)},
    }  # fmt: skip
    stats = {k: {s: torch.tensor(v, dtype=torch.float32) for s, v in d.items()} for k, d in stats.items()}
    pre, post = processor_pi05.make_pi05_pre_post_processors(config, dataset_stats=stats)

    out = save_checkpoint(OUT / name, policy, pre, post, tok)

    # LeRobot's inference on fixed inputs: preprocessor -> predict_action_chunk(noise) -> postprocessor.
    pixels = {k: torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i, k in enumerate(("image", "wrist_image"))}  # fmt: skip
    # a state whose normalised values span the bins, one below the range (bin -1) and one above (255)
    state = torch.tensor(rng.normal(size=STATE_DIM) * 1.5, dtype=torch.float32)
    state[0], state[1] = -50.0, 50.0
    noise = torch.randn(1, CHUNK, MAX_ACTION, generator=torch.Generator().manual_seed(7))
    batch = {f"observation.images.{k}": v.permute(2, 0, 1).float() / 255.0 for k, v in pixels.items()}
    batch |= {"observation.state": state, "task": INSTRUCTION}
    batch = pre(batch)
    seen = record_intermediates(policy.model)
    actions = post(policy.predict_action_chunk(batch, noise=noise.clone()))[0]
    valid = seen["prefix_pad"]
    tensors = {
        **{f"image.{k}": v for k, v in pixels.items()},
        "state": state, "noise": noise[0], "actions": actions.contiguous(),
        "tokens": batch["observation.language.tokens"][0],
        "token_mask": batch["observation.language.attention_mask"][0],
        "prefix_embs": seen["prefix_embs"][valid], "velocity": seen["velocity"], "time": seen["time"],
        **{f"keys.{i}": k[:, valid].contiguous() for i, k in enumerate(seen["keys"])},
        **{f"values.{i}": v[:, valid].contiguous() for i, v in enumerate(seen["values"])},
    }  # fmt: skip
    save_file(tensors, str(out / "reference.safetensors"))
    meta = {"instruction": INSTRUCTION, "lerobot": lerobot.__version__, "torch": torch.__version__,
            "normalization": norm, "use_relative_actions": relative, "untied_embeddings": untie,
            "prompt": tok.decode(tensors["tokens"][tensors["token_mask"].bool()], skip_special_tokens=True)}  # fmt: skip
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    kb = sum(f.stat().st_size for f in out.iterdir()) / 1e3
    print(f"{name}: {kb:.0f} kB, prompt {meta['prompt']!r}, actions[0] = {actions[0].numpy().round(4)}",
          file=sys.stderr)  # fmt: skip


def main() -> int:
    tiny_sizes(modeling_pi05)
    tok = tiny_tokenizer(STATE_CORPUS)
    processor_pi05.TokenizerProcessorStep = functools.partial(
        processor_pi05.TokenizerProcessorStep, tokenizer=tok
    )
    for name, (norm, relative, untie) in CASES.items():
        build_case(name, norm, relative, untie, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
