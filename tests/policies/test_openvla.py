"""The native OpenVLA policy: checkpoints in the official layout, the inference contract, steering.

Tiny models are saved in the real checkpoint layout (HF Prismatic config.json, safetensors with the
official names, a tokenizer with Llama-2's id layout, dataset_statistics.json) and loaded through
`OpenVLAPolicy.load`. Fixtures under tests/data were produced by running the official implementation
(scripts/openvla_reference_keys.py): the 7B state-dict layout and a tiny model's official outputs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from policies.openvla import ConfigError, OpenVLAPolicy, PrismaticConfig, PrismaticModel, processing, tiny
from policies.openvla.reference import reference_weights
from vla_steer.core.config import shipped
from vla_steer.core.steering import Steerer
from vla_steer.wire import Observation

DATA = Path(__file__).parents[1] / "data"
LAYER, NEURON = 3, 7  # the planted neuron: last layer of the tiny Llama
TARGET = 31744 + 10  # the action token it writes: bin 245
INSTRUCTION = "Pick up the cube"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on 2 shared cores: OpenMP threads waiting on each other cost 10-100x. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plant(model: PrismaticModel) -> PrismaticModel:
    """Neuron (LAYER, NEURON): silent unless steered (zero gate/up rows), its value vector = TARGET's row."""
    mlp = model.language_model.model.layers[LAYER].mlp
    head = model.language_model.lm_head.weight
    with torch.no_grad():
        mlp.gate_proj.weight[NEURON] = 0.0
        mlp.up_proj.weight[NEURON] = 0.0
        mlp.down_proj.weight[:, NEURON] = head[TARGET] / head[TARGET].norm()
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.save_checkpoint(tmp_path_factory.mktemp("openvla"), plant(tiny.build_model()))


@pytest.fixture(scope="module")
def policy(ckpt) -> OpenVLAPolicy:
    return OpenVLAPolicy.load(ckpt, unnorm_key="tiny_suite")


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    fixed = [np.zeros((224, 224, 3), np.uint8), np.full((224, 224, 3), 255, np.uint8)]
    return (fixed + [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)])[:n]


def obs(image: np.ndarray) -> Observation:
    return Observation(INSTRUCTION, {"agentview": image})


# -- checkpoint layout and loading -------------------------------------------------------------------


def test_tokenizer_has_llama2_id_layout(policy):
    tok = policy.tokenizer
    assert len(tok) == 32001 and tok.pad_token_id == 32000 and tok.bos_token_id == 1
    assert processing.empty_token_id(tok) == 29871
    assert policy.bins.vocab_size == 32000 and policy.bins.first_id == 31744
    assert policy.model.language_model.get_output_embeddings().weight.shape[0] == 32064


def test_prompt_ends_with_the_empty_piece_like_predict_action(policy):
    ids = processing.prompt_ids(policy.tokenizer, INSTRUCTION)
    assert ids[0] == 1 and ids[-1] == 29871 and ids.count(29871) == 1
    text = policy.tokenizer.decode(ids[1:-1])
    assert text.strip() == "In: What action should the robot take to pick up the cube?\nOut:"


def test_checkpoint_has_official_names_and_loads_them(ckpt, policy):
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        head = f.get_tensor("language_model.lm_head.weight")
    assert names == set(policy.model.state_dict())
    for name in (
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor",
        "vision_backbone.featurizer.reg_token",
        "vision_backbone.fused_featurizer.attn_pool.latent",
        "projector.fc3.weight",
        "language_model.model.layers.3.mlp.down_proj.weight",
    ):
        assert name in names
    assert torch.equal(policy.model.language_model.lm_head.weight, head)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["text_config"]["vocab_size"] == 32064


def test_sharded_checkpoint_loads_the_same(tmp_path, policy):
    tiny.save_checkpoint(tmp_path, plant(tiny.build_model()), max_shard_bytes=2_000_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    sharded = OpenVLAPolicy.load(tmp_path, unnorm_key="tiny_suite")
    for a, b in zip(sharded.model.state_dict().values(), policy.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    image = images(3)[2]
    assert sharded.infer(obs(image)).info["action_tokens"] == policy.infer(obs(image)).info["action_tokens"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_runs(ckpt, dtype):
    p = OpenVLAPolicy.load(ckpt, unnorm_key="tiny_suite", dtype=dtype)
    assert {t.dtype for t in p.model.parameters()} == {getattr(torch, dtype)}
    rotary = p.model.language_model.model.rotary_emb.inv_freq
    assert rotary.dtype == torch.float32 and not rotary.is_meta
    tokens = p.infer(obs(images(1)[0])).info["action_tokens"]
    assert len(tokens) == 7 and all(31744 <= t < 32000 for t in tokens)


def test_checkpoint_with_missing_tensor_is_refused(tmp_path, ckpt):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(ckpt / "model.safetensors"))
    del state["projector.fc3.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys: projector\.fc3\.bias"):
        OpenVLAPolicy.load(tmp_path, unnorm_key="tiny_suite")


def test_config_errors_name_the_key():
    base = json.loads((DATA / "openvla_7b_config.json").read_text())
    with pytest.raises(ConfigError, match="timm_model_ids: unsupported vision backbone 'vit_huge"):
        PrismaticConfig.from_dict(
            {**base, "timm_model_ids": ["vit_huge_x", "vit_so400m_patch14_siglip_224"]}
        ).vit_specs()
    with pytest.raises(ConfigError, match="model_type must be 'openvla' or 'prismatic', got 'llama'"):
        PrismaticConfig.from_dict({**base, "model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenVLAPolicy.load("./no/such/checkpoint")


# -- the official layout and the official outputs ------------------------------------------------------


def test_7b_state_dict_matches_the_official_layout():
    """Names and shapes of OUR model built on the meta device from openvla-7b's config.json against the
    official OpenVLAForActionPrediction's (fixture made by scripts/openvla_reference_keys.py)."""
    with gzip.open(DATA / "openvla_7b_keys.json.gz", "rt") as f:
        official = {name: tuple(shape) for name, shape in json.load(f)["keys"]}
    cfg = PrismaticConfig.from_file(DATA / "openvla_7b_config.json")
    with torch.device("meta"):
        ours = PrismaticModel(cfg)
    mine = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert sorted(set(official) - set(mine)) == [] and sorted(set(mine) - set(official)) == []
    assert {n: s for n, s in mine.items() if official[n] != s} == {}
    assert len(official) == 982 and sum(np.prod(s) for s in official.values()) > 7.5e9
    lm = ours.language_model
    assert len(lm.model.layers) == 32 and lm.model.layers[0].mlp.down_proj.in_features == 11008
    assert cfg.token_vocab_size == 32000


def test_matches_the_official_implementation_on_a_tiny_model(tmp_path):
    """Same weights, image and prompt as the official code was run with: same pixels, logits, tokens."""
    ref = json.loads((DATA / "openvla_tiny_reference.json").read_text())
    arrays = load_file(str(DATA / "openvla_tiny_reference.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ref["config"]))
    with torch.device("meta"):
        shapes = {
            k: list(v.shape)
            for k, v in PrismaticModel(PrismaticConfig.from_dict(ref["config"])).state_dict().items()
        }
    save_file(reference_weights(shapes), str(tmp_path / "model.safetensors"))
    tiny.build_tokenizer().save_pretrained(tmp_path)
    p = OpenVLAPolicy.load(tmp_path, unnorm_key=ref["unnorm_key"])
    assert torch.equal(p.image_processor(arrays["image"].numpy()), arrays["pixel_values"])
    ids = torch.tensor([ref["input_ids"] + [29871]])
    with torch.no_grad():
        logits = p.model.language_model(inputs_embeds=p.model.embed(ids, arrays["pixel_values"])).logits
    torch.testing.assert_close(
        logits[0, -1, 31744:32000], arrays["prefill_action_logits"], atol=1e-4, rtol=1e-4
    )
    tokens = p.generate(ids, arrays["pixel_values"]).tolist()
    assert tokens == ref["action_tokens"]
    np.testing.assert_allclose(p.decode_actions(np.array(tokens)), ref["actions"], rtol=0, atol=1e-12)


# -- the inference contract ----------------------------------------------------------------------------


def test_the_image_changes_the_action(policy):
    """openvla#346: the remote code on transformers >= 4.50 ignores the image; here it must not."""
    tokens = {tuple(policy.infer(obs(img)).info["action_tokens"]) for img in images(4)}
    assert len(tokens) > 1
    seq = policy.model.embed(policy.input_ids(INSTRUCTION), policy.pixel_values(images(1)[0])).shape[1]
    assert (
        seq == len(processing.prompt_ids(policy.tokenizer, INSTRUCTION)) + 256
    )  # 16 x 16 patches, both ViTs fused per patch


def test_detokenisation_and_unnormalisation_by_hand(policy):
    ids = np.array([31999, 31744, 31871, 31872, 31800, 31900, 31500])  # 31500: not an action token
    got = policy.decode_actions(ids)
    # bin = 32000 - id - 1, clipped to [0, 254]; centre of bin k = -1 + (2k + 1) / 255.
    centres = [-1 + 1 / 255, -1 + 509 / 255, -1 + 257 / 255, -1 + 255 / 255, -1 + 399 / 255, -1 + 199 / 255]
    centres.append(-1 + 509 / 255)  # clipped to bin 254
    q01 = [-0.75, -0.8, -0.9, -0.1, -0.2, -0.3]
    q99 = [0.9, 0.85, 0.95, 0.12, 0.2, 0.35]
    expected = [0.5 * (c + 1) * (hi - lo) + lo for c, lo, hi in zip(centres[:6], q01, q99, strict=True)]
    expected.append(centres[6])  # gripper: masked, left as the bin centre
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[0] == pytest.approx(-0.75 + 0.5 * (1 / 255) * 1.65)
    libero = processing.gripper_to_libero(np.array([[0, 0, 0, 0, 0, 0, 0.9], [0, 0, 0, 0, 0, 0, 0.1]]))
    assert libero[:, -1].tolist() == [-1.0, 1.0]  # open -> -1, close -> +1


def test_unnorm_key_errors_list_the_keys(ckpt, tmp_path):
    with pytest.raises(
        KeyError, match=r"unnorm_key 'libero_10' .* available: \['other_suite', 'tiny_suite'\]"
    ):
        OpenVLAPolicy.load(ckpt, unnorm_key="libero_10")
    with pytest.raises(
        KeyError,
        match=r"several datasets; choose one with unnorm_key .*--option unnorm_key=NAME.* one of \['other_suite', 'tiny_suite'\]",
    ):
        OpenVLAPolicy.load(ckpt)
    with pytest.raises(KeyError, match="no action statistics"):
        processing.select_stats({}, None, source="x")
    one = tiny.save_checkpoint(tmp_path, stats={"only": tiny.TINY_STATS["tiny_suite"]})
    assert OpenVLAPolicy.load(one).stats.key == "only"  # a single dataset needs no key


def test_center_crop_is_tf_crop_and_resize(policy):
    ramp = np.broadcast_to(np.arange(224, dtype=np.uint8)[None, :, None], (224, 224, 3)).copy()
    out = processing.center_crop(ramp)
    side = np.sqrt(0.9)
    x = (1 - side) / 2 * 223 + np.arange(224) * side  # bilinear on a ramp is the sampled coordinate
    expected = np.floor(x / 255 * 255.5).astype(np.uint8)
    assert out.shape == (224, 224, 3) and np.array_equal(out[5, :, 1], expected)
    flat = processing.center_crop(np.full((200, 300, 3), 77, np.uint8))
    assert flat.shape == (224, 224, 3) and np.all(flat == 77)
    cropped = OpenVLAPolicy(
        policy.model, policy.tokenizer, processing.ImageProcessor(policy.image_processor.transforms, True),
        policy.stats,
    )  # fmt: skip
    img = images(3)[2]
    assert not torch.equal(cropped.pixel_values(img), policy.pixel_values(img))


def test_preprocessing_normalises_per_backbone(policy):
    colour = np.array([200, 100, 50], np.uint8)
    px = policy.pixel_values(np.broadcast_to(colour, (180, 260, 3)).copy())  # squashed to 224 x 224
    assert px.shape == (1, 6, 224, 224)
    c = colour / 255.0
    dino = (c - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    siglip = (c - 0.5) / 0.5
    np.testing.assert_allclose(px[0, :, 100, 100].numpy(), np.concatenate([dino, siglip]), atol=1e-6)


# -- steering and the policy interface -----------------------------------------------------------------


def test_backbone_exposes_gated_mlps_unembedding_and_action_labels(policy):
    bb = policy.backbone
    assert bb.layers_path == "model.layers" and bb.n_layers == 4 and bb.vocab_size == 32064
    assert bb.root is policy.model.language_model
    assert bb.labeler.label(31999) == "[action -0.996]" and bb.labeler.label(32010) == "[padding]"
    from vla_steer.core.discovery.projection import project

    proj = project(bb, k=3, device="cpu", progress=False)
    assert proj.top_ids[proj.row(LAYER), NEURON, 0].item() == TARGET  # discovery finds the planted neuron


def test_steering_a_planted_neuron_changes_the_action(policy):
    image = images(3)[2]
    base = policy.infer(obs(image))
    assert TARGET not in base.info["action_tokens"]
    with Steerer(policy.backbone) as steerer:
        steerer.add("planted", [(LAYER, NEURON)], strength=200.0)
        steered = policy.infer(obs(image))
        assert steered.info["action_tokens"] == [TARGET] * 7
        np.testing.assert_allclose(steered.actions[0], policy.decode_actions(np.array([TARGET] * 7)))
        steerer.off()
        assert policy.infer(obs(image)).info["action_tokens"] == base.info["action_tokens"]


@pytest.mark.parametrize("positions", ["all", "last"])
def test_steering_reaches_the_prefill_and_every_decoded_token(policy, positions):
    seen: list[torch.Tensor] = []
    down = policy.backbone.down_proj(LAYER)
    with Steerer(policy.backbone, positions=positions) as steerer:
        steerer.add("planted", [(LAYER, NEURON)], strength=5.0)
        watch = down.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, :, NEURON].clone()))
        try:  # registered after the Steerer's hook: sees the steered coefficients
            policy.infer(obs(images(1)[0]))
        finally:
            watch.remove()
    assert len(seen) == 7 and seen[0].shape[0] > 256 and all(s.shape == (1,) for s in seen[1:])
    assert all(s[-1].item() == 5.0 for s in seen)  # the prefill's last position and every action token
    expected_rest = 5.0 if positions == "all" else 0.0  # the neuron is silent when not steered
    assert torch.all(seen[0][:-1] == expected_rest)


def test_serves_through_the_policy_node(policy):
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Client, Server

    node = PolicyNode(policy)
    node.steerer.add("planted", [(LAYER, NEURON)], strength=0.0, enabled=False)
    payload = {"instruction": INSTRUCTION, "images": {"agentview": images(3)[2]}}
    with Server(node, "tcp://127.0.0.1:0").start() as server, Client(server.address) as client:
        info = client.hello()
        assert info.action_dim == 7 and dict(info.image_keys) == {"agentview": (224, 224, 3)}
        base = client.infer(payload).actions.copy()
        client.set_knobs({"planted": 200.0})
        steered = client.infer(payload).actions
    assert base.shape == (1, 7) and not np.array_equal(base, steered)
    np.testing.assert_allclose(steered[0], policy.decode_actions(np.array([TARGET] * 7)), rtol=1e-6)


def test_policy_configs_use_load_arguments():
    import inspect

    import yaml

    params = set(inspect.signature(OpenVLAPolicy.load).parameters) - {"cls", "path"}
    configs = sorted(shipped("policies").glob("openvla*.yaml"))
    assert configs
    for path in configs:
        data = yaml.safe_load(path.read_text())
        assert data["kind"] == "openvla" and "path" in data
        assert set(data) - {"kind", "path"} <= params, path
