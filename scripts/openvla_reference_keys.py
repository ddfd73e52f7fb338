"""Produce the OpenVLA reference fixtures from the OFFICIAL implementation (not run in CI).

Runs the official HF port (openvla/openvla, `prismatic/extern/hf/{configuration,modeling,processing}_
prismatic.py`) in its own environment, outside this repository, with the versions it pins:

    python3 -m venv /tmp/ovla-venv
    /tmp/ovla-venv/bin/pip install torch==2.13.0
    /tmp/ovla-venv/bin/pip install torch==2.13.0 transformers==4.40.1 timm==0.9.10 tokenizers==0.19.1 'numpy<2'
    mkdir -p /tmp/ovla-hf && for f in configuration_prismatic modeling_prismatic processing_prismatic; do
        git --git-dir OPENVLA_GIT show HEAD:prismatic/extern/hf/$f.py > /tmp/ovla-hf/$f.py; done
    /tmp/ovla-venv/bin/python scripts/openvla_reference_keys.py --hf-code /tmp/ovla-hf --out tests/data

Writes (fixtures were produced at openvla/openvla c8f03f48af692657d3060c19588038c7220e9af9):

  openvla_7b_config.json     the config.json the official conversion script writes for openvla-7b
                             (OpenVLAConfig with prism-dinosiglip-224px+7b's settings, text_config patched
                             to vocab 32064 / pad 32000 / bf16 exactly as convert_openvla_weights_to_hf.py
                             does); norm_stats left null (the real statistics are not available here).
  openvla_7b_keys.json.gz    every state-dict name and shape of OpenVLAForActionPrediction built on the
                             meta device (its ViTs on the CPU: timm cannot
                             build on meta) from that config (LayerScale patched to `scale_factor`, as the
                             official code does).
  openvla_tiny_reference.*   a tiny official model (ViTs shrunk through timm.create_model's own keyword
                             arguments, which our config key `timm_model_args` mirrors), filled with
                             `policies/openvla/reference.py:reference_weights`, and what the official code
                             computes with it: PrismaticImageProcessor pixel values for a seeded image,
                             predict_action's greedy action tokens (generate with the KV cache), the
                             un-normalised actions, and the prefill logits over the action bins.

torchvision's PyPI wheels are CUDA builds whose C++ ops cannot load next to a CPU-only torch; importing
torchvision then fails while registering fake kernels for those ops. Nothing here uses them (timm imports
torchvision for transforms and FrozenBatchNorm2d), so the script skips just those registrations.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.library

REPO = Path(__file__).resolve().parents[1]
TINY_VITS = [dict(embed_dim=32, depth=3, num_heads=2), dict(embed_dim=48, depth=3, num_heads=2)]
TINY_IMAGE = 56
TINY_TEXT = dict(
    vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, pad_token_id=32000,
)  # fmt: skip
TINY_STATS = {
    "tiny_suite": {
        "action": {
            "q01": [-0.75, -0.8, -0.9, -0.1, -0.2, -0.3, 0.0],
            "q99": [0.9, 0.85, 0.95, 0.12, 0.2, 0.35, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    }
}
# BOS, then arbitrary word ids; predict_action appends 29871 itself.
TINY_PROMPT_IDS = [1, 66, 67, 65, 68, 35, 46, 61, 40, 149, 119, 35, 122, 64]


def _tolerate_torchvision_fake_kernels() -> None:
    original = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if not (isinstance(op, str) and op.startswith("torchvision::")):
            return original(op, *args, **kwargs)

        def decorate(fn):
            try:
                return original(op, *args, **kwargs)(fn)
            except RuntimeError:  # the op's C++ library did not load: nothing to register against
                return fn

        return decorate

    torch.library.register_fake = register_fake


def _load_official(hf_code: Path):
    """The three official files imported as a package (they use relative imports)."""
    spec = importlib.util.spec_from_file_location(
        "openvla_hf", hf_code / "__init__.py", submodule_search_locations=[str(hf_code)]
    )
    if not (hf_code / "__init__.py").exists():
        (hf_code / "__init__.py").write_text("")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["openvla_hf"] = pkg
    spec.loader.exec_module(pkg)
    import openvla_hf.configuration_prismatic as conf
    import openvla_hf.modeling_prismatic as modeling
    import openvla_hf.processing_prismatic as processing

    return conf, modeling, processing


def _reference_weights():
    spec = importlib.util.spec_from_file_location("ovla_reference", REPO / "policies/openvla/reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference_weights


def seven_b(conf, modeling, out: Path) -> None:
    cfg = conf.OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        llm_max_length=2048,
        torch_dtype=torch.bfloat16,
        norm_stats=None,
    )
    cfg.text_config.vocab_size += cfg.pad_to_multiple_of  # as convert_openvla_weights_to_hf.py
    cfg.text_config.pad_token_id = cfg.pad_token_id
    cfg.text_config.torch_dtype = torch.bfloat16
    (out / "openvla_7b_config.json").write_text(cfg.to_json_string(use_diff=True))
    cfg = conf.OpenVLAConfig.from_json_file(str(out / "openvla_7b_config.json"))  # what a loader reads
    # timm's ViT constructor cannot run on the meta device (the official converter says so too): the
    # ViTs (~0.7B parameters) are built on the CPU, the Llama on the meta device.
    from_config = modeling.AutoModelForCausalLM.from_config

    def llm_on_meta(*args, **kwargs):
        with torch.device("meta"):
            return from_config(*args, **kwargs)

    modeling.AutoModelForCausalLM.from_config = llm_on_meta
    model = modeling.OpenVLAForActionPrediction(cfg)
    modeling.AutoModelForCausalLM.from_config = from_config
    keys = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    with gzip.open(out / "openvla_7b_keys.json.gz", "wt") as f:
        json.dump({"source": "openvla/openvla prismatic/extern/hf (official)", "keys": keys}, f)
    print(f"7B: {len(keys)} tensors, {sum(np.prod(s) for _, s in keys) / 1e9:.3f}B parameters")


def tiny(conf, modeling, processing, out: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ids = iter(TINY_VITS * 2)
    create = timm.create_model
    modeling.timm.create_model = lambda name, **kw: create(name, **{**kw, **next(ids)})
    cfg = conf.OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        image_resize_strategy="resize-naive",
        image_sizes=[TINY_IMAGE, TINY_IMAGE],
        text_config=TINY_TEXT,
        norm_stats=TINY_STATS,
    )
    model = modeling.OpenVLAForActionPrediction(cfg).eval()
    modeling.timm.create_model = create
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(_reference_weights()(shapes), strict=True)

    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    from PIL import Image

    ip = processing.PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[(3, TINY_IMAGE, TINY_IMAGE)] * 2,
        interpolations=["bicubic", "bicubic"],
        means=[(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)],
        stds=[(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)],
    )
    pixel_values = ip(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([TINY_PROMPT_IDS])
    with torch.no_grad():
        actions = model.predict_action(input_ids=input_ids, pixel_values=pixel_values, unnorm_key="tiny_suite",
                                       do_sample=False)  # fmt: skip
        full = torch.cat([input_ids, torch.tensor([[29871]])], dim=1)
        generated = model.generate(full, pixel_values=pixel_values, max_new_tokens=7, do_sample=False)
        logits = model(input_ids=full, pixel_values=pixel_values).logits[0, -1, 31744:32000]
    tokens = generated[0, -7:]
    top2 = logits.topk(2).values
    print("tiny: tokens", tokens.tolist(), "actions", np.round(actions, 4).tolist(),
          "first-step margin", float(top2[0] - top2[1]))  # fmt: skip
    config = json.loads(cfg.to_json_string(use_diff=True))
    config["timm_model_args"] = TINY_VITS
    (out / "openvla_tiny_reference.json").write_text(
        json.dumps(
            {
                "config": config,
                "input_ids": TINY_PROMPT_IDS,
                "unnorm_key": "tiny_suite",
                "action_tokens": tokens.tolist(),
                "actions": np.asarray(actions).tolist(),
                "note": "produced by scripts/openvla_reference_keys.py from the official HF port",
            },
            indent=1,
        )
    )
    save_file(
        {
            "image": torch.from_numpy(image),
            "pixel_values": pixel_values.float().contiguous(),
            "prefill_action_logits": logits.float().contiguous(),
        },
        str(out / "openvla_tiny_reference.safetensors"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-code", type=Path, required=True, help="directory with the three official files")
    p.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    args = p.parse_args()
    _tolerate_torchvision_fake_kernels()
    conf, modeling, processing = _load_official(args.hf_code)
    args.out.mkdir(parents=True, exist_ok=True)
    seven_b(conf, modeling, args.out)
    tiny(conf, modeling, processing, args.out)


if __name__ == "__main__":
    main()
