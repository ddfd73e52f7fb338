"""Tiny pi0-FAST checkpoints written, and run, by LeRobot 0.6's own code: the reference that
tests/policies/test_pi0fast_lerobot_equivalence.py holds this project's pi0-FAST to.

Runs in a side environment, never the project's (LeRobot needs Python >= 3.12 and its own torch):

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lerobot-venv
    /tmp/lerobot-venv/bin/pip install 'lerobot[pi]==0.6.1'        # torch 2.11, transformers 5.5, scipy
    HF_HUB_OFFLINE=1 PYTHONPATH=. /tmp/lerobot-venv/bin/python scripts/lerobot_pi0fast_reference.py   # -> tests/data/lerobot_pi0fast/

Per case, tests/data/lerobot_pi0fast/<case>/ holds what LeRobot's `save_pretrained` wrote (config.json,
model.safetensors, the pre/post-processor files with the normalisation stats), the PaliGemma-role
tokenizer, the FAST processor in `fast_tokenizer/`, and reference.safetensors + reference.json: the inputs,
the prompt tokens, the prefix hidden states, every decoding step's logits, the decoded tokens and the
actions that LeRobot's processors and `predict_action_chunk` produced. `fast_tokenizer.json` holds the FAST
processor's own encodings and LeRobot's `detokenize_actions` on hand-made token sequences (valid, cut at
"|", "Action: " removed, too short, too long, ids outside the FAST range, empty).

What is patched, and why:
- sizes only (as for pi0): LeRobot's pi0_fast hard-codes the Gemma variant, SigLIP So400m and the
  257152-token vocabulary; `get_gemma_config` and the PaliGemma constructor are shrunk as they are built.
- the tokenizers, since no hub is reachable: LeRobot loads the FAST processor with
  `AutoProcessor.from_pretrained("lerobot/fast-action-tokenizer", trust_remote_code=True)` (the hub's
  `UniversalActionProcessor`). LeRobot ships that same class (lerobot.policies.molmoact2...action_tokenizer:
  `__call__`, `decode`, `fit`, and `from_pretrained_local`, which reads tokenizer.json + processor_config.json
  from a local directory). Here the processor is FITTED with that class's own `fit` on smooth random chunks,
  saved to `fast_tokenizer/`, and `AutoProcessor` in modeling_pi0_fast is replaced by a loader that returns
  `UniversalActionProcessor.from_pretrained_local(<that directory>)`. `AutoTokenizer` (PaliGemma's) returns
  the project's tiny BPE tokenizer, with "|" and "\\n" added and BOS prepended as PaliGemma does.
Every computation is LeRobot's. config.json gets one extra key, `vla_steer_architecture` (the tiny sizes).
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
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.molmoact2.molmoact2_hf_model.action_tokenizer import UniversalActionProcessor
from lerobot.policies.pi0_fast import modeling_pi0_fast, processor_pi0_fast
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
from lerobot.policies.pi0_fast.modeling_pi0_fast import GemmaConfig, PI0FastPolicy
from lerobot.processor import tokenizer_processor
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "lerobot_pi0fast"
VOCAB = 384
PALIGEMMA = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
VISION = {"hidden": 32, "intermediate": 64, "depth": 1, "num_heads": 2, "patch": 8, "image_size": 32}
STATE_DIM, ACTION_DIM, CHUNK, FAST_VOCAB = 8, 7, 10, 192
INSTRUCTION = "pick up the red block"
# case -> (n_action_steps, use_relative_actions, the decoding step that writes "|", None: no end marker)
CASES = {
    "plain": (CHUNK, False, None),
    "relative": (CHUNK, True, None),
    "horizon": (6, False, None),  # LeRobot decodes with time_horizon = n_action_steps, not chunk_size
    "stops": (CHUNK, False, 9),  # "|" decoded mid-way: decoding stops, what follows is cut
}


def tiny_sizes() -> None:
    """Shrink LeRobot's hard-coded sizes where its classes are built (nothing it computes changes)."""
    modeling_pi0_fast.get_gemma_config = lambda variant: PALIGEMMA

    def paligemma(real, config):
        config.text_config.vocab_size = VOCAB
        v = config.vision_config
        v.hidden_size, v.intermediate_size = VISION["hidden"], VISION["intermediate"]
        v.num_hidden_layers, v.num_attention_heads = VISION["depth"], VISION["num_heads"]
        v.patch_size, v.projection_dim, v.image_size = VISION["patch"], PALIGEMMA.width, VISION["image_size"]
        return real(config=config)

    name = "PaliGemmaForConditionalGenerationWithPiGemma"
    setattr(modeling_pi0_fast, name, functools.partial(paligemma, getattr(modeling_pi0_fast, name)))


def tiny_tokenizer():
    """The project's tiny tokenizer in PaliGemma's role (policies/pi0_fast/tiny.py: a base vocabulary of
    VOCAB - 2 pieces, then "\\n" and "|"; BOS prepended)."""
    return project_module("tiny").paligemma_tokenizer(VOCAB)


def project_module(name: str):
    """This project's policies/pi0_fast/<name>.py (`fast`: `smooth_chunks`, the data both sides fit on;
    `tiny`: the tokenizer), imported by path: the project's package needs its own environment."""
    import importlib.util

    path = ROOT / "policies" / "pi0_fast" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"project_{name}", path)
    module = sys.modules[f"project_{name}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fast_processor(directory: Path) -> UniversalActionProcessor:
    """The reference FAST processor, fitted by its own `fit` on smooth random normalised chunks."""
    chunks = project_module("fast").smooth_chunks(400, CHUNK, ACTION_DIM, seed=0)
    proc = UniversalActionProcessor.fit(chunks, scale=10, vocab_size=FAST_VOCAB)
    proc.bpe_tokenizer.save_pretrained(directory)
    config = {"scale": proc.scale, "vocab_size": proc.vocab_size, "min_token": proc.min_token,
              "action_dim": None, "time_horizon": None, "processor_class": "UniversalActionProcessor"}  # fmt: skip
    (directory / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return UniversalActionProcessor.from_pretrained_local(str(directory))


def patch_loaders(tok, fast_dir: Path) -> None:
    class LocalProcessor:  # stands in for AutoProcessor(trust_remote_code) on the hub
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return UniversalActionProcessor.from_pretrained_local(str(fast_dir))

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return tok

    modeling_pi0_fast.AutoProcessor = LocalProcessor
    modeling_pi0_fast.AutoTokenizer = LocalTokenizer
    tokenizer_processor.AutoTokenizer = LocalTokenizer  # the action-tokenizer step's PaliGemma tokenizer
    processor_pi0_fast.TokenizerProcessorStep = functools.partial(
        processor_pi0_fast.TokenizerProcessorStep, tokenizer=tok
    )
    # The action-tokenizer step runs only in training (no action at inference); given objects, not names.
    processor_pi0_fast.ActionTokenizerProcessorStep = functools.partial(
        processor_pi0_fast.ActionTokenizerProcessorStep,
        action_tokenizer_input_object=LocalProcessor.from_pretrained(),
    )


def fast_range(tok) -> tuple[int, int]:
    top = tok.vocab_size - 1 - 128
    return top - FAST_VOCAB + 1, top


def build_case(name: str, n_steps: int, relative: bool, stop_at: int | None, tok, fast_dir: Path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = {f"observation.images.{k}": PolicyFeature(FeatureType.VISUAL, (3, 32, 32))
              for k in ("image", "wrist_image")}  # fmt: skip
    names = [f"joint_{i}" for i in range(ACTION_DIM - 1)] + ["gripper"]
    config = PI0FastConfig(
        input_features={**images, "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        chunk_size=CHUNK,
        n_action_steps=n_steps,
        max_state_dim=12,
        max_action_dim=10,
        image_resolution=(VISION["image_size"], VISION["image_size"]),
        tokenizer_max_length=48,
        max_decoding_steps=20,
        validate_action_token_prefix=False,  # a random tiny model never writes "Action: " first
        use_relative_actions=relative,
        action_feature_names=names if relative else None,
        device="cpu",
        push_to_hub=False,
    )
    policy = PI0FastPolicy(config)
    pg = policy.model.paligemma_with_expert.paligemma
    lo, hi = fast_range(tok)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random tiny weights give near-zero outputs: spread them so differences show
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        head = pg.lm_head.weight
        if head.data_ptr() == pg.model.language_model.embed_tokens.weight.data_ptr():
            raise SystemExit("lm_head is tied to embed_tokens here: changing it would change the embedding")
        # a trained pi0-FAST writes FAST tokens: large random FAST rows put the argmax among them, varied
        head[lo : hi + 1] = 0.5 * torch.randn(hi + 1 - lo, head.shape[1], generator=gen)
    stats = {
        "observation.state": {"mean": rng.normal(size=STATE_DIM), "std": rng.uniform(0.5, 2.0, STATE_DIM)},
        "action": {"mean": rng.normal(size=ACTION_DIM), "std": rng.uniform(0.5, 2.0, ACTION_DIM)},
    }
    stats = {k: {s: torch.tensor(v, dtype=torch.float32) for s, v in d.items()} for k, d in stats.items()}
    pre, post = processor_pi0_fast.make_pi0_fast_pre_post_processors(config, dataset_stats=stats)

    # Record what the language model computes: its hidden states (all positions, first call = the
    # prefix) and every lm_head call's logits (the prefix's last position, then one per decoded token).
    pixels = {k: torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i, k in enumerate(("image", "wrist_image"))}  # fmt: skip
    state = torch.tensor(rng.normal(size=STATE_DIM) * 0.8, dtype=torch.float32)
    batch = {f"observation.images.{k}": v.permute(2, 0, 1).float() / 255.0 for k, v in pixels.items()}
    batch |= {"observation.state": state, "task": INSTRUCTION}
    if stop_at is not None:  # "|" gets a row that wins at step stop_at only (see end_marker_row)
        with torch.no_grad():
            head[tok.convert_tokens_to_ids("|")] = end_marker_row(policy, pre(dict(batch)), stop_at)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copytree(fast_dir, out / "fast_tokenizer")
    data = json.loads((out / "config.json").read_text())
    data["vla_steer_architecture"] = {"paligemma": vars(PALIGEMMA), "vision": VISION, "vocab_size": VOCAB}
    (out / "config.json").write_text(json.dumps(data, indent=4))

    batch = pre(batch)
    tokens_out: list[torch.Tensor] = []
    sample = policy.model.sample_actions_fast_kv_cache

    def recording(*args, **kwargs):
        result = sample(*args, **kwargs)
        tokens_out.append(result.clone())
        return result

    lm = pg.model.language_model
    seen: dict[str, list] = {"hidden": [], "logits": []}
    hooks = [
        # LeRobot calls the language model's .forward directly: its final norm is the module that fires
        lm.norm.register_forward_hook(lambda m, a, o: seen["hidden"].append(o[0].detach().clone())),
        pg.lm_head.register_forward_hook(lambda m, a, o: seen["logits"].append(o[0, -1].detach().clone())),
    ]
    policy.model.sample_actions_fast_kv_cache = recording
    actions = post(policy.predict_action_chunk(batch))[0]
    for h in hooks:
        h.remove()
    print(name, tokens_out[0].tolist(), file=sys.stderr)
    mask = batch["observation.language.attention_mask"][0].bool()
    n_img = seen["hidden"][0].shape[1] - mask.shape[0] - 1
    keep = torch.cat([torch.ones(n_img, dtype=torch.bool), mask, torch.ones(1, dtype=torch.bool)])
    decoded = tokens_out[0][0]
    save_file({**{f"image.{k}": v for k, v in pixels.items()}, "state": state,
               "prompt_tokens": batch["observation.language.tokens"][0][mask].contiguous(),
               "prefix_hidden": seen["hidden"][0][0, keep].contiguous(),
               "step_logits": torch.stack(seen["logits"]).contiguous(),
               "decoded": decoded.contiguous(), "actions": actions.contiguous()},
              str(out / "reference.safetensors"))  # fmt: skip
    bar = tok.convert_tokens_to_ids("|")
    meta = {"instruction": INSTRUCTION, "lerobot": lerobot.__version__, "torch": torch.__version__,
            "use_relative_actions": relative, "n_action_steps": n_steps,
            "end_marker_decoded": bool((decoded == bar).any())}  # fmt: skip
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{name}: {size / 1e3:.0f} kB, decoded {decoded.tolist()}, actions[0] = {actions[0].numpy().round(4)}",
          file=sys.stderr)  # fmt: skip
    return policy


def end_marker_row(policy: PI0FastPolicy, batch: dict, step: int) -> torch.Tensor:
    """An lm_head row for "|" whose logit is 0 at decoding steps before `step` and twice the winning logit
    at `step`: the final hidden state there, less its part in the span of the earlier ones."""
    pg = policy.model.paligemma_with_expert.paligemma
    inputs: list[torch.Tensor] = []
    hook = pg.lm_head.register_forward_hook(lambda m, a, o: inputs.append(a[0][0, -1].detach().clone()))
    policy.predict_action_chunk(batch)
    hook.remove()
    earlier, h = torch.stack(inputs[:step]), inputs[step]
    q, _ = torch.linalg.qr(earlier.T.double())
    u = (h.double() - q @ (q.T @ h.double())).float()
    with torch.no_grad():
        win = pg.lm_head(h).max()
    return u * (2 * win / (u @ h))


def tokenizer_reference(policy: PI0FastPolicy, proc: UniversalActionProcessor, tok) -> dict:
    """The processor's encodings of fixed chunks, and LeRobot's detokenize_actions on made-up sequences."""
    chunks = [
        c.astype(np.float32) for c in project_module("fast").smooth_chunks(4, CHUNK, ACTION_DIM, seed=123)
    ]
    chunks.append(np.full((CHUNK, ACTION_DIM), 0.05, np.float32))
    encoded = [proc(c[None])[0] for c in chunks]
    decoded = [proc.decode([e], time_horizon=CHUNK, action_dim=ACTION_DIM)[0] for e in encoded]
    top = tok.vocab_size - 1 - 128
    to_pg = [top - int(i) for i in encoded[0]]  # FAST id -> PaliGemma id
    action = tok.encode("Action: ", add_special_tokens=False)
    bar, word = tok.convert_tokens_to_ids("|"), tok.convert_tokens_to_ids("\n")
    above = tok.vocab_size - 5  # a PaliGemma id above the FAST range: a negative FAST id
    below = top - FAST_VOCAB - 3  # below it: a FAST id the BPE does not have
    sequences = {
        "valid": to_pg,
        "action_prefix_and_end": action + to_pg + [bar, above, 7],
        "short": to_pg[: len(to_pg) // 2],
        "long": to_pg + to_pg[:5],
        "above_range": to_pg[:3] + [above] + to_pg[3:],
        "below_range": to_pg[:3] + [below] + to_pg[3:],
        "empty": [bar] + to_pg,
        "newline": to_pg[:2] + [word] + to_pg[2:],
    }
    detok = {}
    for name, seq in sequences.items():
        try:
            out = policy.detokenize_actions(torch.tensor(seq), CHUNK, ACTION_DIM)
            detok[name] = {"tokens": seq, "actions": out.numpy().astype(float).tolist()}
        except Exception as e:  # noqa: BLE001 - what LeRobot raises is part of the reference
            detok[name] = {"tokens": seq, "raises": type(e).__name__}
    return {
        "chunks": [c.astype(float).tolist() for c in chunks],
        "encoded": [[int(i) for i in e] for e in encoded],
        "decoded": [d.astype(float).tolist() for d in decoded],
        "time_horizon": CHUNK,
        "action_dim": ACTION_DIM,
        "detokenize": detok,
    }


def main() -> int:
    tiny_sizes()
    tok = tiny_tokenizer()
    OUT.mkdir(parents=True, exist_ok=True)
    fast_dir = OUT / "_fast_tokenizer"
    shutil.rmtree(fast_dir, ignore_errors=True)
    fast_dir.mkdir()
    proc = fast_processor(fast_dir)
    patch_loaders(tok, fast_dir)
    policies = {name: build_case(name, *spec, tok, fast_dir) for name, spec in CASES.items()}
    policy = policies["plain"]
    policy.config.validate_action_token_prefix = False
    ref = tokenizer_reference(policy, proc, tok)
    (OUT / "fast_tokenizer.json").write_text(json.dumps(ref) + "\n")
    shutil.rmtree(fast_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
