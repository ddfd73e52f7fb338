"""A tiny OpenVLA in the real checkpoint layout, for tests and benchmarks (nothing downloads).

Same files as a hub checkpoint: config.json (HF Prismatic format; `timm_model_args` shrinks the ViTs),
model.safetensors (or shards + index) with the official parameter names, tokenizer files,
dataset_statistics.json. The tokenizer has Llama-2's id layout: 32000 pieces (<unk> 0, <s> 1, </s> 2,
"▁" 29871, ids 31744..31999 reused as action bins) plus <PAD> 32000, and the Llama's embedding is padded
to 32064. Word pieces come from a small BPE trained on robot instructions; the other ids are filler pieces
the BPE never produces (as Llama-2's rare pieces never appear in prompts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from policies.openvla.config import PrismaticConfig
from policies.openvla.modeling import PrismaticModel
from policies.openvla.processing import EMPTY_PIECE, PROMPT, STATS_FILE
from policies.openvla.reference import reference_weights
from vla_steer.core.tiny import instruction_corpus

TOKENIZER_VOCAB = 32000
EMPTY_ID = 29871
PAD_TO = 64

# Per-dimension statistics of a LIBERO-like dataset (xyz, rotation, gripper), for hand-checkable tests.
TINY_STATS: dict[str, Any] = {
    "tiny_suite": {
        "action": {
            "q01": [-0.75, -0.8, -0.9, -0.1, -0.2, -0.3, 0.0],
            "q99": [0.9, 0.85, 0.95, 0.12, 0.2, 0.35, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    },
    "other_suite": {
        "action": {
            "q01": [-1.0] * 6 + [0.0],
            "q99": [1.0] * 6 + [1.0],
            "mask": [True] * 6 + [False],
        }
    },
}


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """A Llama-2-layout tokenizer (see module doc): BOS added, "▁" at 29871, <PAD> at 32000."""
    trainer_vocab = 640
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=trainer_vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    corpus = [PROMPT.format(instruction=line) for line in instruction_corpus(seed=seed)]
    bpe.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = trained["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    # Llama-2's layout: move "▁" to 29871, fill every other free id with a piece the BPE never emits.
    by_id: list[str | None] = [None] * TOKENIZER_VOCAB
    for piece, i in vocab.items():
        if piece != EMPTY_PIECE:
            by_id[i] = piece
    by_id[EMPTY_ID] = EMPTY_PIECE
    layout = {piece if piece is not None else f"⟦{i}⟧": i for i, piece in enumerate(by_id)}
    tok = Tokenizer(models.BPE(vocab=layout, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"pad_token": "<PAD>"})  # id 32000, as openvla-7b's added_tokens.json
    return fast


def tiny_config(
    *,
    hidden: int = 64,
    layers: int = 4,
    intermediate: int = 128,
    heads: int = 4,
    vit_dims: tuple[int, int] = (32, 48),
    vit_depth: int = 3,
    image_size: int = 224,
    norm_stats: dict[str, Any] | None = None,
) -> PrismaticConfig:
    data = {
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "image_sizes": [image_size, image_size],
        "timm_model_args": [{"embed_dim": d, "depth": vit_depth, "num_heads": 2} for d in vit_dims],
        "text_config": {
            "model_type": "llama",
            "vocab_size": TOKENIZER_VOCAB + PAD_TO,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "pad_token_id": TOKENIZER_VOCAB,
        },
        "pad_token_id": TOKENIZER_VOCAB,
        "pad_to_multiple_of": PAD_TO,
        "n_action_bins": 256,
        "norm_stats": norm_stats,
    }
    return PrismaticConfig.from_dict(data, source="tiny config")


def build_model(cfg: PrismaticConfig | None = None, *, seed: int = 0) -> PrismaticModel:
    """Seeded random weights (`reference.reference_weights`: fan-in scaled, LayerScale 0.1 so the tiny
    ViTs' blocks matter, action rows of lm_head enlarged so greedy tokens are action bins)."""
    with torch.device("meta"):
        model = PrismaticModel(cfg or tiny_config())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_weights(shapes, seed=seed), assign=True)
    model._rebuild_buffers(torch.device("cpu"))
    return model.eval()


def save_checkpoint(
    directory: str | Path,
    model: PrismaticModel | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    stats: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a tiny checkpoint directory in the official layout."""
    directory = Path(directory)
    model = model or build_model()
    tokenizer = tokenizer or build_tokenizer()
    model.save_pretrained(directory, max_shard_bytes=max_shard_bytes)
    tokenizer.save_pretrained(directory)
    (directory / STATS_FILE).write_text(json.dumps(TINY_STATS if stats is None else stats, indent=2))
    return directory
