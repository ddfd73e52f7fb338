"""Tokens, lexicons and the choice of concept neurons, on a real subword vocabulary."""

from __future__ import annotations

import pytest
import torch

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery import discover
from vla_steer.core.discovery.grouping import group_direction
from vla_steer.core.discovery.lexicon import (
    load_lexicon,
    load_lexicons,
    select_direction,
    token_match_weights,
)
from vla_steer.core.discovery.projection import project
from vla_steer.core.tokens import ActionBins, TokenLabeler, normalize_token


def test_normalize_token_strips_markers_case_and_punctuation():
    assert normalize_token("▁Quickly") == "quickly"
    assert normalize_token("Ġup") == "up"
    assert normalize_token(" High,") == "high"
    assert normalize_token("▁") == ""


def test_action_bins_decode_like_openvla():
    bins = ActionBins(vocab_size=32000, n_bins=256)
    assert bins.first_id == 31744
    # bin = 32000 - id - 1, clipped to [0, 254]; value = centre of that bin of linspace(-1, 1, 256).
    assert bins.value(31999) == pytest.approx(-1 + 1 / 255)
    assert bins.value(31744) == pytest.approx(1 - 1 / 255)  # bin 255 is clipped to 254
    assert bins.value(31745) == pytest.approx(1 - 1 / 255)
    assert bins.value(31872) == pytest.approx(-1 + 2 / 255 * 127 + 1 / 255)
    assert not bins.contains(31743) and bins.contains(31744) and not bins.contains(32000)


def test_special_ranges_are_labelled_and_never_matched_as_words():
    pieces = ["<unk>", "▁up", "up", "<loc0012>", "<seg003>", "▁high", "▁down"]
    lab = TokenLabeler(pieces, action_bins=ActionBins(vocab_size=7, n_bins=2), padded_to=9)
    assert lab.label(3) == "[loc 12]" and lab.label(4) == "[seg 3]"
    assert lab.label(5).startswith("[action") and lab.label(6).startswith("[action")  # top 2 ids are bins
    assert lab.label(8) == "[padding]"
    assert lab.word(1) == "up" and lab.word(3) is None and lab.word(5) is None and lab.word(8) is None
    w = token_match_weights(lab, frozenset({"up", "high"}))
    assert w.tolist() == [0, 1.0, 0.5, 0, 0, 0, 0, 0, 0]  # "up" without ▁ is a continuation piece


def test_subword_pieces_and_inflections_match(tokenizer, poles):
    lab = TokenLabeler.from_tokenizer(tokenizer)
    w = token_match_weights(lab, poles["fast"].words)
    vocab = tokenizer.get_vocab()
    assert w[vocab["▁quickly"]] == 1.0
    assert w[vocab["▁the"]] == 0.0
    pieces = [t for t, i in vocab.items() if t.startswith("▁") and 0 < w[i] < 1.0]
    assert pieces, "expected some partial matches (word-start pieces or inflections) in a BPE vocabulary"


def plant(
    bb: Backbone, layer: int, index: int, tokens: list[str], sign: float = 1.0, scale: float = 3.0
) -> None:
    """Make neuron (layer, index) write `tokens` (or, with sign -1, write them when its coefficient is negative)."""
    vocab = bb.tokenizer.get_vocab()
    ids = [vocab[t] for t in tokens]
    w = bb.effective_unembedding()
    v = w[ids].sum(0) / bb.norm_gain**2  # W_U_eff @ v = W_U @ sum(W_U[ids]): peaks at ids
    with torch.no_grad():
        bb.down_proj(layer).weight[:, index] = sign * scale * v / v.norm()


FAST = ["▁fast", "▁quickly", "▁rapidly", "▁swiftly", "▁faster"]
SLOW = ["▁slowly", "▁slow", "▁gradually", "▁sluggish", "▁slower"]
UP = ["▁up", "▁high", "▁higher", "▁raise", "▁upward"]


def test_lexicon_finds_planted_neurons_with_their_sign(llama, poles):
    plant(llama, 2, 11, FAST)
    plant(llama, 3, 50, FAST, sign=-1.0)  # expresses "fast" when its coefficient is negative
    plant(llama, 1, 7, SLOW)
    plant(llama, 2, 30, UP)
    p = project(llama, k=10, device="cpu", progress=False)
    fast = select_direction(p, llama.labeler, poles["fast"], size=2)
    assert {(n.layer, n.index, n.sign) for n in fast.neurons} == {(2, 11, 1.0), (3, 50, -1.0)}
    assert "fast" in fast.neurons[0].tokens
    slow = select_direction(p, llama.labeler, poles["slow"], size=3)
    assert (1, 7, 1.0) in {(n.layer, n.index, n.sign) for n in slow.neurons}
    assert not {(2, 11), (3, 50)} & {(n.layer, n.index) for n in slow.neurons}  # fast neurons are not slow
    up = select_direction(p, llama.labeler, poles["up"], size=1)
    assert (up.neurons[0].layer, up.neurons[0].index) == (2, 30)
    # Layer range: the layer-2 planted neuron is out of range 3-3, the layer-3 one in.
    ranged = select_direction(p, llama.labeler, poles["fast"], size=1, layers=(3, 3))
    assert (ranged.neurons[0].layer, ranged.neurons[0].index) == (3, 50)


def test_min_score_leaves_out_weak_neurons(llama, poles):
    p = project(llama, k=10, device="cpu", progress=False)
    d = select_direction(p, llama.labeler, poles["fast"], size=50, min_score=1e9)
    assert d.neurons == []


def test_automatic_grouping_finds_the_cluster_nearest_the_concept(llama):
    # Give the "up" words a shared meaning in the embedding, as a trained model's would have.
    vocab = llama.tokenizer.get_vocab()
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(llama.d_model, generator=g)
    with torch.no_grad():
        for t in UP:
            llama.input_embedding[vocab[t]] = shared + 0.3 * torch.randn(llama.d_model, generator=g)
    plant(llama, 1, 4, UP)
    plant(llama, 3, 9, UP[::-1], sign=-1.0)
    p = project(llama, k=8, device="cpu", progress=False)
    d = group_direction(llama, p, "up", ["up", "high"], size=2, candidates=128, n_clusters=8)
    assert {(n.layer, n.index, n.sign) for n in d.neurons} == {(1, 4, 1.0), (3, 9, -1.0)}
    assert d.provenance["method"] == "embedding-clusters"


def test_discover_runs_every_pole_and_records_provenance(llama, poles, tmp_path):
    plant(llama, 2, 11, FAST)
    dirs = discover(llama, poles, index_dir=tmp_path, size=4, progress=False, device="cpu")
    assert set(dirs) == set(poles)
    fast = dirs["fast"]
    assert (2, 11) in {(n.layer, n.index) for n in fast.neurons}
    assert fast.provenance["model_fingerprint"] == llama.fingerprint()
    assert fast.provenance["method"] == "lexicon" and fast.concept == "speed"
    with pytest.raises(ValueError, match="outside"):
        discover(llama, poles, layers=(2, 40), progress=False)


def test_repo_lexicons_define_the_required_concepts(poles):
    assert {"fast", "slow", "up", "down", "careful"} <= set(poles)
    assert poles["fast"].opposite.name == "slow" and poles["up"].concept == "height"


def test_lexicon_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "speed.yaml"
    bad.write_text("concept: speed\npoles:\n  fast: {wordz: [fast]}\n")
    with pytest.raises(ValueError, match=r"speed.yaml: poles\.fast\.words: Field required"):
        load_lexicon(bad)
    bad.write_text("concept: speed\npoles: {fast: {words: [':::']}}\n")
    with pytest.raises(ValueError, match="empty after normalisation"):
        load_lexicon(bad)
    bad.write_text("concept: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_lexicon(bad)
    (tmp_path / "speed.yaml").write_text("concept: speed\npoles: {fast: {words: [fast]}}\n")
    (tmp_path / "tempo.yaml").write_text("concept: tempo\npoles: {fast: {words: [quick]}}\n")
    with pytest.raises(ValueError, match="tempo.yaml: pole 'fast' is already defined by concept 'speed'"):
        load_lexicons(tmp_path)
    with pytest.raises(FileNotFoundError, match="no concept lexicons"):
        load_lexicons(tmp_path / "nowhere")


def test_layer_range_is_a_hard_limit_whatever_the_threshold(llama, poles):
    p = project(llama, k=10, device="cpu", progress=False)
    d = select_direction(p, llama.labeler, poles["fast"], size=10_000, layers=(1, 2), min_score=1e-9)
    assert d.neurons and all(1 <= n.layer <= 2 and n.score > 0 for n in d.neurons)
    with pytest.raises(ValueError, match="min_score > 0"):
        select_direction(p, llama.labeler, poles["fast"], min_score=0.0)
