"""Projection of value vectors onto the vocabulary: exactness, chunking, norms, caching, LoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from vla_steer.core.backbone import Backbone, BackboneError
from vla_steer.core.discovery.index import load_or_project, read_manifest
from vla_steer.core.discovery.projection import Tiling, project
from vla_steer.core.loading import load_backbone


def dense_reference(bb: Backbone, k: int, rank_by: str = "logit"):
    """The whole [neurons x vocab] matrix at once: what the chunked projection must equal."""
    w = bb.unembedding.detach().float() * bb.norm_gain
    out = {"top": [], "bottom": []}
    for layer in range(bb.n_layers):
        v = bb.value_vectors(layer).float()
        logits = (w @ v).T  # [d_mlp, vocab]
        if rank_by == "cosine":
            # Zero rows (a padding embedding) score 0, not NaN.
            logits = logits / (
                w.norm(dim=1).clamp_min(1e-12)[None, :] * v.norm(dim=0).clamp_min(1e-12)[:, None]
            )
        out["top"].append(torch.topk(logits, k, dim=1))
        out["bottom"].append(torch.topk(logits, k, dim=1, largest=False))
    return out


@pytest.mark.parametrize("rank_by", ["logit", "cosine"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_projection_equals_dense_reference(request, family, rank_by):
    bb = request.getfixturevalue(family)
    p = project(bb, k=7, rank_by=rank_by, device="cpu", progress=False)
    ref = dense_reference(bb, 7, rank_by)
    for layer in range(bb.n_layers):
        for side in ("top", "bottom"):
            ids = getattr(p, f"{side}_ids")[layer]
            assert torch.equal(ids, ref[side][layer].indices), (family, side, layer)
            score = getattr(p, f"{side}_{'cos' if rank_by == 'cosine' else 'logit'}")[layer]
            torch.testing.assert_close(score, ref[side][layer].values, rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_results(llama):
    whole = project(llama, k=5, device="cpu", progress=False)
    # A budget this small forces many vocabulary tiles and neuron chunks.
    tiling = Tiling.for_budget(llama.vocab_size, llama.d_model, llama.d_mlp, 5, 20_000)
    assert tiling.vocab_tile < llama.vocab_size and tiling.neuron_chunk < llama.d_mlp
    chunked = project(llama, k=5, memory_budget=20_000, device="cpu", progress=False)
    for name in ("top_ids", "bottom_ids"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))
    for name in ("top_logit", "bottom_logit", "top_cos", "bottom_cos"):
        torch.testing.assert_close(getattr(whole, name), getattr(chunked, name))


def test_tiling_respects_the_budget_for_paligemma_shapes():
    budget = 1 << 30
    t = Tiling.for_budget(257152, 2048, 16384, 20, budget)
    assert t.peak_bytes(2048, 20) <= budget
    assert t.vocab_tile < 257152  # the float32 unembedding alone would be 2.1 GB


def test_gemma_norm_gain_folded_as_in_the_model(gemma):
    """W_U_eff @ v must be what the real final norm + lm_head give for residual v, times rms(v)."""
    model = gemma.root
    torch.testing.assert_close(gemma.norm_gain, 1.0 + model.model.norm.weight.float())
    assert gemma.unembedding.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    v = gemma.value_vectors(1)[:, :5].T.float()  # 5 value vectors as residuals
    with torch.no_grad():
        model_logits = model.lm_head(model.model.norm(v))
    rms = v.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()
    ours = (gemma.effective_unembedding() @ v.T).T / rms
    torch.testing.assert_close(ours, model_logits, rtol=1e-4, atol=1e-4)


def test_llama_norm_gain_is_the_weight(llama):
    model = llama.root
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    bb = Backbone.from_model(model, llama.tokenizer)
    v = bb.value_vectors(0)[:, :3].T.float()
    with torch.no_grad():
        model_logits = model.lm_head(model.model.norm(v))
    rms = v.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()
    torch.testing.assert_close((bb.effective_unembedding() @ v.T).T / rms, model_logits, rtol=1e-4, atol=1e-4)


def test_paligemma_text_stack_in_transformers5_layout(tmp_path, tokenizer):
    cfg = PaliGemmaConfig(
        text_config=dict(
            model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer),
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    assert bb.layers_path == "model.language_model.layers"
    assert bb.n_layers == 2 and bb.d_mlp == 64
    p = project(bb, k=4, device="cpu", progress=False)
    ref = dense_reference(bb, 4)
    assert torch.equal(p.top_ids[1], ref["top"][1].indices)


def test_several_stacks_need_an_explicit_path(llama):
    class TwoStacks(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.backbone, self.expert = a, b

    model = TwoStacks(llama.root.model, copy.deepcopy(llama.root.model))
    with pytest.raises(BackboneError, match="several gated-MLP stacks"):
        Backbone.from_model(model)
    bb = Backbone.from_model(model, layers_path="expert.layers")
    assert bb.unembedding is None and bb.n_layers == llama.n_layers
    with pytest.raises(BackboneError, match="cannot be projected"):
        project(bb, progress=False)


def test_index_is_reused_only_while_the_fingerprint_matches(llama, tmp_path):
    first = load_or_project(llama, tmp_path, k=6, device="cpu", progress=False)
    manifest = read_manifest(tmp_path)
    assert manifest["model_fingerprint"] == llama.fingerprint() and manifest["k"] == 6
    mtime = (tmp_path / "neuron_index.safetensors").stat().st_mtime_ns
    # Same model, smaller k: served from disk, cut to k.
    again = load_or_project(llama, tmp_path, k=4, device="cpu", progress=False)
    assert (tmp_path / "neuron_index.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again.top_ids, first.top_ids[:, :, :4])
    # Modified weights: a new fingerprint, so the index is recomputed and differs.
    with torch.no_grad():
        llama.down_proj(2).weight.mul_(-1.0)
    changed = Backbone.from_model(llama.root, llama.tokenizer, labeler=llama.labeler)
    assert changed.fingerprint() != manifest["model_fingerprint"]
    recomputed = load_or_project(changed, tmp_path, k=6, device="cpu", progress=False)
    assert torch.equal(recomputed.top_ids[2], first.bottom_ids[2])  # negating v swaps top and bottom
    assert read_manifest(tmp_path)["model_fingerprint"] == changed.fingerprint()


def _write_lora(directory, model, targets, r=2, alpha=8, seed=0):
    """A PEFT-format adapter: adapter_config.json + adapter_model.safetensors with PEFT's key names."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in targets:
        lin = model.get_submodule(name)
        a = torch.randn(r, lin.in_features, generator=g)
        b = torch.randn(lin.out_features, r, generator=g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        deltas[name] = (b @ a) * (alpha / r)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["down_proj"], "fan_in_fan_out": False}
    ))  # fmt: skip
    return deltas


def test_lora_adapter_is_merged_before_projecting(llama_dir, tmp_path):
    base = load_backbone(llama_dir)
    targets = [f"model.layers.{i}.mlp.down_proj" for i in range(base.n_layers)]
    deltas = _write_lora(tmp_path / "adapter", base.root, targets)
    merged = load_backbone(llama_dir, lora=tmp_path / "adapter")
    for name, delta in deltas.items():
        expected = base.root.get_submodule(name).weight + delta
        torch.testing.assert_close(merged.root.get_submodule(name).weight, expected)
    assert merged.fingerprint() != base.fingerprint()
    p = project(merged, k=5, device="cpu", progress=False)
    assert torch.equal(p.top_ids[0], dense_reference(merged, 5)["top"][0].indices)


def test_lora_errors_name_the_problem(llama_dir, tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_backbone(llama_dir, lora=tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match="lora_alpha"):
        load_backbone(llama_dir, lora=tmp_path / "a")


def test_adapters_that_cannot_be_merged_fully_are_refused(llama_dir, tmp_path):
    base = load_backbone(llama_dir)
    _write_lora(tmp_path / "dora", base.root, ["model.layers.0.mlp.down_proj"])
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_backbone(llama_dir, lora=tmp_path / "dora")
    _write_lora(tmp_path / "extra", base.root, ["model.layers.0.mlp.down_proj"])
    weights = load_file(str(tmp_path / "extra" / "adapter_model.safetensors"))
    weights["base_model.model.lm_head.modules_to_save.default.weight"] = base.unembedding.detach().clone()
    save_file(weights, str(tmp_path / "extra" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="cannot merge.*modules_to_save"):
        load_backbone(llama_dir, lora=tmp_path / "extra")


def test_bad_arguments_are_rejected(llama):
    with pytest.raises(ValueError, match="rank_by"):
        project(llama, rank_by="magic", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        project(llama, layers=[99], progress=False)
    with pytest.raises(ValueError, match="k must be"):
        project(llama, k=0, progress=False)
