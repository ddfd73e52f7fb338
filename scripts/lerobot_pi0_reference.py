"""Tiny pi0 checkpoints written, and run, by LeRobot 0.6's own code: the reference that
tests/policies/test_pi0_lerobot_equivalence.py holds this project's pi0 to.

Runs in a side environment, never the project's (LeRobot needs Python >= 3.12 and its own torch):

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lerobot-venv
    /tmp/lerobot-venv/bin/pip install 'lerobot[pi]==0.6.1'        # torch 2.11, transformers 5.5
    PYTHONPATH=. /tmp/lerobot-venv/bin/python scripts/lerobot_pi0_reference.py   # -> tests/data/lerobot_pi0/

Per case, tests/data/lerobot_pi0/<case>/ holds what LeRobot's `save_pretrained` wrote (config.json,
model.safetensors, the pre/post-processor files with the normalisation stats), the tokenizer, and
reference.safetensors + reference.json: the inputs, the noise, and the actions LeRobot's processors and
`predict_action_chunk` produced from them.

What is patched, and only to make the model tiny: LeRobot's pi0 hard-codes the Gemma variants, the
SigLIP So400m tower and the 257152-token vocabulary. The generator shrinks those sizes as the classes
are constructed (`get_gemma_config`, the PaliGemma and expert model constructors) and hands the
PaliGemma tokenizer step the tiny tokenizer (no hub here); every computation is LeRobot's. config.json
then gets one extra key, `vla_steer_architecture`, the tiny sizes that LeRobot's config cannot express
(this project's reader takes the sizes from it).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import lerobot
import numpy as np
import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.pi0 import modeling_pi0, processor_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import GemmaConfig, PI0Policy
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "lerobot_pi0"
VOCAB = 512
PALIGEMMA = GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16)
EXPERT = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
VISION = {"hidden": 32, "intermediate": 64, "depth": 1, "num_heads": 2, "patch": 8, "image_size": 32}
STATE_DIM, ACTION_DIM, MAX_STATE, MAX_ACTION, CHUNK = 8, 7, 12, 10, 6
INSTRUCTION = "pick up the red block"
# case -> (camera sizes (image, wrist_image), use_relative_actions, untie and fine-tune the embeddings)
CASES = {
    "plain": ((32, 32), False, False),
    "finetuned": ((32, 32), False, True),
    "relative": ((32, 32), True, False),
    "camera256": ((256, 32), False, False),
}


def tiny_sizes(modeling=modeling_pi0) -> None:
    """Shrink LeRobot's hard-coded sizes where its classes are built (nothing it computes changes);
    `modeling`: LeRobot's pi0 module, or pi05's (it builds its model from the same names)."""
    modeling.get_gemma_config = lambda variant: PALIGEMMA if variant == "gemma_2b" else EXPERT

    def paligemma(real, config):
        config.text_config.vocab_size = VOCAB
        v = config.vision_config
        v.hidden_size, v.intermediate_size = VISION["hidden"], VISION["intermediate"]
        v.num_hidden_layers, v.num_attention_heads = VISION["depth"], VISION["num_heads"]
        v.patch_size, v.projection_dim = VISION["patch"], PALIGEMMA.width
        return real(config=config)

    def expert(real, config):
        config.vocab_size = VOCAB  # its lm_head is never used, but saved
        return real(config=config)

    for name, wrap in (("PaliGemmaForConditionalGenerationWithPiGemma", paligemma),
                       ("PiGemmaForCausalLM", expert)):  # fmt: skip
        setattr(modeling, name, functools.partial(wrap, getattr(modeling, name)))


def tiny_tokenizer(corpus: tuple[str, ...] = ()):
    """The project's tiny BPE tokenizer made to behave as PaliGemma's where pi0's prompt relies on it:
    BOS added, and "\\n" one token of its own (LeRobot tokenizes "task\\n" at once, this project BOS, the
    task and "\\n" apart; PaliGemma gives the same ids either way, a plain Metaspace BPE does not).
    `corpus`: more training text (pi0.5's prompt holds the state as numbers)."""
    from tokenizers import processors

    from vla_steer.core import tiny

    tok = tiny.build_tokenizer(vocab_size=VOCAB - 8, extra_words=["quickly", "slowly"], corpus=corpus)
    tok.add_tokens(["\n"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # noqa: SLF001
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert len(tok) <= VOCAB, len(tok)
    return tok


def build_case(name: str, sizes: tuple[int, int], relative: bool, untie: bool, tok) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = {f"observation.images.{k}": PolicyFeature(FeatureType.VISUAL, (3, s, s))
              for k, s in zip(("image", "wrist_image"), sizes, strict=True)}  # fmt: skip
    names = [f"joint_{i}" for i in range(ACTION_DIM - 1)] + ["gripper"]
    config = PI0Config(
        input_features={**images, "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        chunk_size=CHUNK,
        n_action_steps=4,
        max_state_dim=MAX_STATE,
        max_action_dim=MAX_ACTION,
        num_inference_steps=3,
        image_resolution=(VISION["image_size"], VISION["image_size"]),
        use_relative_actions=relative,
        action_feature_names=names if relative else None,
        device="cpu",
        push_to_hub=False,
    )
    policy = PI0Policy(config)
    pg = policy.model.paligemma_with_expert.paligemma
    with torch.no_grad():  # random tiny weights give near-zero outputs: spread them so differences show
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        embed = pg.model.language_model.embed_tokens.weight
        pg.lm_head.weight.copy_(embed)  # a released base checkpoint: PaliGemma's tied pair, equal
        if untie:  # what LeRobot's fine-tuning leaves: its separate lm_head as loaded, embed_tokens trained
            embed.add_(0.05 * torch.randn_like(embed))
    stats = {
        "observation.state": {"mean": rng.normal(size=STATE_DIM), "std": rng.uniform(0.5, 2.0, STATE_DIM)},
        "action": {"mean": rng.normal(size=ACTION_DIM), "std": rng.uniform(0.5, 2.0, ACTION_DIM)},
    }
    stats = {k: {s: torch.tensor(v, dtype=torch.float32) for s, v in d.items()} for k, d in stats.items()}
    assert config.normalization_mapping["STATE"] == NormalizationMode.MEAN_STD
    pre, post = processor_pi0.make_pi0_pre_post_processors(config, dataset_stats=stats)

    out = save_checkpoint(OUT / name, policy, pre, post, tok)

    # LeRobot's inference on fixed inputs: preprocessor -> predict_action_chunk(noise) -> postprocessor.
    pixels = {k: torch.randint(0, 256, (s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i, (k, s) in enumerate(zip(("image", "wrist_image"), sizes, strict=True))}  # fmt: skip
    state = torch.tensor(rng.normal(size=STATE_DIM) * 2, dtype=torch.float32)
    noise = torch.randn(1, CHUNK, MAX_ACTION, generator=torch.Generator().manual_seed(7))
    batch = {f"observation.images.{k}": v.permute(2, 0, 1).float() / 255.0 for k, v in pixels.items()}
    batch |= {"observation.state": state, "task": INSTRUCTION}
    batch = pre(batch)
    actions = post(policy.predict_action_chunk(batch, noise=noise.clone()))[0]
    save_file({**{f"image.{k}": v for k, v in pixels.items()}, "state": state, "noise": noise[0],
               "actions": actions.contiguous(), "tokens": batch["observation.language.tokens"][0]},
              str(out / "reference.safetensors"))  # fmt: skip
    meta = {"instruction": INSTRUCTION, "lerobot": lerobot.__version__, "torch": torch.__version__,
            "use_relative_actions": relative, "untied_embeddings": untie}  # fmt: skip
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1e3:.0f} kB, actions[0] = {actions[0].numpy().round(4)}", file=sys.stderr)


def save_checkpoint(out: Path, policy, pre, post, tok) -> Path:
    """What LeRobot's `save_pretrained` writes, plus the tiny sizes its config cannot express."""
    shutil.rmtree(out, ignore_errors=True)
    for part in (policy, pre, post, tok):
        part.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data["vla_steer_architecture"] = {
        "paligemma": vars(PALIGEMMA), "expert": vars(EXPERT), "vision": VISION, "vocab_size": VOCAB,
        "max_state_dim": MAX_STATE, "max_action_dim": MAX_ACTION,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(data, indent=4))
    return out


def main() -> int:
    tiny_sizes()
    tok = tiny_tokenizer()
    processor_pi0.TokenizerProcessorStep = functools.partial(
        processor_pi0.TokenizerProcessorStep, tokenizer=tok
    )
    for name, (sizes, relative, untie) in CASES.items():
        build_case(name, sizes, relative, untie, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
