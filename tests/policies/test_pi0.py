"""pi0: a tiny model saved in the LeRobot (and openpi) checkpoint layouts, loaded through the real loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pi0 import CHUNK, MAX_ACTION, make_obs, noise_of, tiny_config, tiny_stats

from policies.pi0 import checkpoint as ckpt
from policies.pi0.config import Feature, PI0Architecture, PI0Config, read_config
from policies.pi0.modeling import PI0Model, make_att_2d_masks, time_embedding
from policies.pi0.policy import PI0Policy
from vla_steer.core import tiny
from vla_steer.core.steering import Steerer
from vla_steer.wire import Observation

REFERENCE = Path(__file__).parents[1] / "data" / "pi0_reference_layout.json"


@pytest.fixture(scope="module")
def pi0_tokenizer():
    return tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"])


@pytest.fixture(scope="module")
def built(pi0_tokenizer):
    cfg = tiny_config(vocab_size=len(pi0_tokenizer))
    return PI0Policy.build(cfg, pi0_tokenizer, seed=0, stats=tiny_stats())


@pytest.fixture(scope="module")
def pi0_dir(built, tmp_path_factory):
    return built.save(tmp_path_factory.mktemp("pi0"))


@pytest.fixture
def policy(pi0_dir):
    """A fresh load per test (tests attach hooks)."""
    return PI0Policy.load(pi0_dir, seed=0)


# -- loading -----------------------------------------------------------------------------------------


def test_lerobot_checkpoint_layout_on_disk(pi0_dir):
    cfg = json.loads((pi0_dir / "config.json").read_text())
    assert cfg["type"] == "pi0" and cfg["chunk_size"] == CHUNK
    from safetensors import safe_open

    with safe_open(str(pi0_dir / ckpt.WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "model.paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.down_proj.weight" in keys
    assert "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.gate_proj.weight" in keys
    assert "model.action_time_mlp_in.weight" in keys
    assert all(k.startswith("model.") for k in keys)


@pytest.mark.parametrize("layout", ["current", "original", "openpi"])
def test_every_layout_loads_to_the_same_policy(built, tmp_path, layout):
    obs, noise = make_obs(), noise_of(1)
    if layout == "openpi":
        path = built.save(tmp_path, layout="openpi")
        loaded = PI0Policy.load(
            path,
            openpi_image_keys=["observation.images.image", "observation.images.wrist_image"],
            state_dim=8,
            action_dim=7,
            num_inference_steps=3,
            n_action_steps=4,
        )
        tol = 1e-4  # openpi normalises with std + 1e-6 (LeRobot: 1e-8)
    else:
        path = built.save(tmp_path, generation=layout)
        loaded = PI0Policy.load(path)
        tol = 0.0
    want = built.infer(obs, noise=noise).actions
    got = loaded.infer(obs, noise=noise).actions
    assert got.shape == (4, 7)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_load_refuses_missing_and_misshaped_weights(built, tmp_path):
    path = built.save(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / ckpt.WEIGHTS))
    key = "model.action_out_proj.weight"
    save_file({k: v for k, v in weights.items() if k != key}, str(path / ckpt.WEIGHTS))
    with pytest.raises(ckpt.CheckpointError, match="missing keys.*action_out_proj"):
        PI0Policy.load(path)
    weights[key] = torch.zeros(3, 3)
    save_file(weights, str(path / ckpt.WEIGHTS))
    with pytest.raises(ckpt.CheckpointError, match="action_out_proj.weight has shape"):
        PI0Policy.load(path)


def test_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"type": "pi0_fast"}))
    with pytest.raises(ValueError, match="config.json: type is 'pi0_fast'"):
        read_config(bad)
    bad.write_text(json.dumps({"type": "pi0", "paligemma_variant": "gemma_7b", "input_features": {}}))
    with pytest.raises(ValueError, match="paligemma_variant is 'gemma_7b'"):
        read_config(bad)


def test_missing_stats_are_an_error(built, tmp_path):
    path = built.save(tmp_path)
    (path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="MEAN_STD normalisation of action needs stat 'mean'"):
        PI0Policy.load(path)


# -- inference ---------------------------------------------------------------------------------------


def test_deterministic_given_noise_or_seed(policy, pi0_dir):
    obs = make_obs()
    a = policy.infer(obs, noise=noise_of(3)).actions
    b = policy.infer(obs, noise=noise_of(3)).actions
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, policy.infer(obs, noise=noise_of(4)).actions)
    first = [policy.infer(obs).actions for _ in range(2)]
    assert not np.array_equal(first[0], first[1])  # the generator moves on within an episode
    policy.reset()
    again = [policy.infer(obs).actions for _ in range(2)]
    other = PI0Policy.load(pi0_dir, seed=0)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(first[0], other.infer(obs).actions)


def test_image_state_and_prompt_each_change_the_actions(policy):
    obs, noise = make_obs(), noise_of(5)
    base = policy.infer(obs, noise=noise).actions
    other = make_obs(seed=9)
    variants = {
        "image": Observation(obs.instruction, {**obs.images, "image": other.images["image"]}, obs.state),
        "wrist": Observation(
            obs.instruction, {**obs.images, "wrist_image": other.images["wrist_image"]}, obs.state
        ),
        "state": Observation(obs.instruction, obs.images, other.state),
        "prompt": Observation("put the bowl on the plate", obs.images, obs.state),
    }
    for name, variant in variants.items():
        out = policy.infer(variant, noise=noise).actions
        assert np.abs(out - base).max() > 1e-4, f"{name} does not change the actions"


def test_flow_integrates_from_noise_at_t1_to_actions_at_t0(policy):
    """With a constant velocity field v = c, N Euler steps of dt = -1/N move x from noise to noise - c."""
    model = policy.model
    with torch.no_grad():
        model.action_out_proj.weight.zero_()
        model.action_out_proj.bias.copy_(torch.linspace(-1, 1, MAX_ACTION))
    noise = noise_of(6)
    normed = model(**policy.model_inputs(make_obs(), noise))[0]
    torch.testing.assert_close(normed, noise - torch.linspace(-1, 1, MAX_ACTION), atol=1e-5, rtol=0)
    # and the action statistics un-normalise it: x * std + mean, first action_dim columns
    stats = tiny_stats()["action"]
    want = normed[:4, :7].numpy() * stats["std"] + stats["mean"]
    np.testing.assert_allclose(policy.infer(make_obs(), noise=noise).actions, want, rtol=1e-5, atol=1e-5)


def test_attention_masks_follow_pi0():
    # prefix of 3 (last one padding), state, 2 actions
    pad = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    ar = torch.tensor([[0, 0, 0, 1, 1, 0]])
    m = make_att_2d_masks(pad, ar)[0]
    assert m[:2, :2].all() and not m[:2, 3:].any()  # bidirectional prefix that never sees the suffix
    assert m[3, :2].all() and m[3, 3] and not m[3, 4:].any()  # the state sees the prefix, not the actions
    assert m[4:, [0, 1, 3, 4, 5]].all()  # actions: prefix, state and each other
    assert not m[:, 2].any() and not m[2].any()  # padding is invisible


def test_prefix_is_computed_once_and_unaffected_by_the_suffix(policy):
    model = policy.model
    inputs = policy.model_inputs(make_obs(), noise_of(0))
    calls = []
    handle = model.paligemma_with_expert.language_model.layers[0].mlp.register_forward_hook(
        lambda *a: calls.append(1)
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert len(calls) == 1  # the language stack runs once per inference; the expert once per step
    with torch.no_grad():
        prefix = model.embed_prefix(
            inputs["images"], inputs["image_masks"], inputs["tokens"], inputs["token_mask"]
        )
        cache = model.fill_prefix_cache(*prefix)
        v1 = model.denoise_step(cache, inputs["state"], inputs["noise"], torch.ones(1))
        # actions attend to each other: perturbing the last action's noise moves the first action's velocity
        x = inputs["noise"].clone()
        x[:, -1] += 1.0
        v2 = model.denoise_step(cache, inputs["state"], x, torch.ones(1))
    assert not torch.equal(v1[:, 0], v2[:, 0])
    assert all(
        torch.equal(k, k2) for k, k2 in zip(cache.keys, model.fill_prefix_cache(*prefix).keys, strict=True)
    )


def test_time_embedding_is_sine_cosine():
    emb = time_embedding(torch.tensor([0.0, 0.5]), 8, 4e-3, 4.0)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    period = 4e-3 * (4.0 / 4e-3) ** torch.linspace(0, 1, 4, dtype=torch.float64)
    torch.testing.assert_close(emb[1, :4].double(), torch.sin(2 * torch.pi * 0.5 / period))


# -- steering ----------------------------------------------------------------------------------------


def test_backbones(policy, pi0_tokenizer):
    bbs = policy.backbones
    assert set(bbs) == {"language", "action_expert"}
    assert policy.backbone is bbs["language"]
    lang, expert = bbs["language"], bbs["action_expert"]
    assert (lang.n_layers, lang.d_model, lang.d_mlp) == (2, 64, 128)
    assert lang.vocab_size == len(pi0_tokenizer) and lang.norm_gain is not None
    assert (expert.n_layers, expert.d_model, expert.d_mlp) == (2, 32, 64)
    assert expert.unembedding is None
    assert lang.fingerprint() != expert.fingerprint()


@pytest.mark.parametrize("stack", ["language", "action_expert"])
def test_steering_changes_actions_and_unsteered_is_bit_identical(policy, stack):
    obs, noise = make_obs(), noise_of(7)
    plain = policy.infer(obs, noise=noise).actions
    steerer = Steerer(policy.backbones[stack])
    steerer.add("probe", [(0, 3), (1, 5), (1, 9)], mode="clamp", strength=8.0, enabled=False)
    np.testing.assert_array_equal(policy.infer(obs, noise=noise).actions, plain)  # hooked, all off
    with steerer.apply(probe=8.0):
        steered = policy.infer(obs, noise=noise).actions
    assert np.abs(steered - plain).max() > 1e-3
    np.testing.assert_array_equal(policy.infer(obs, noise=noise).actions, plain)  # off again
    steerer.remove()
    np.testing.assert_array_equal(policy.infer(obs, noise=noise).actions, plain)


def test_one_inference_is_one_forward_of_the_steered_root(policy):
    """The Steerer's guard hooks sit on the backbone root: one inference must be one root forward."""
    root = policy.backbones["action_expert"].root
    assert root is policy.backbones["language"].root is policy.model
    calls = []
    handle = root.register_forward_pre_hook(lambda *a: calls.append(1))
    policy.infer(make_obs(), noise=noise_of(0))
    handle.remove()
    assert calls == [1]


# -- the full-size architecture against the reference layouts -----------------------------------------


def _expand(templates: dict, ranges: dict) -> dict[str, tuple]:
    out = {}
    for key, shape in templates.items():
        if "{i}" in key:
            out |= {key.format(i=i): tuple(shape) for i in range(ranges["i"])}
        elif "{j}" in key:
            out |= {key.format(j=j): tuple(shape) for j in range(ranges["j"])}
        else:
            out[key] = tuple(shape)
    return out


@pytest.fixture(scope="module")
def full_size_meta():
    with torch.device("meta"):
        return PI0Model(PI0Architecture())


def test_full_size_names_and_shapes_match_openpi_and_lerobot(full_size_meta):
    ref = json.loads(REFERENCE.read_text())
    openpi = _expand(ref["openpi_keys"], ref["ranges"])
    ours = {k: tuple(v.shape) for k, v in ckpt.unique_state(full_size_meta).items()}
    assert ours == openpi
    ((tied, target),) = ref["tied"].items()
    assert full_size_meta.state_dict()[tied].shape == tuple(openpi[target])
    # LeRobot current: 'model.' + the same names; LeRobot original: the transformers-4.48 renames
    current = {ref["lerobot_current_prefix"] + k: v for k, v in openpi.items()}
    original = {}
    for k, v in current.items():
        for new, old in ref["lerobot_original_renames"]:
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        original[k] = v
    meta_state = ckpt.unique_state(full_size_meta)
    assert {k: tuple(v.shape) for k, v in ckpt.to_old_lerobot_keys(meta_state).items()} == original
    for layout in (current, original, openpi):
        fake = {k: torch.empty(0) for k in layout}
        fake |= {k: torch.empty(0) for k in ref["unused_in_reference"]}  # dropped on load
        mapped = ckpt.to_module_keys(fake)
        assert set(mapped) == set(full_size_meta.state_dict())


def test_full_size_backbones_have_pi0_dimensions(full_size_meta, pi0_tokenizer):
    cfg = PI0Config(PI0Architecture(), images=[Feature("observation.image", "VISUAL", (3, 224, 224))])
    policy = PI0Policy(cfg, full_size_meta, pi0_tokenizer)
    lang, expert = policy.backbones["language"], policy.backbones["action_expert"]
    assert (lang.n_layers, lang.d_model, lang.d_mlp, lang.unembedding.shape[0]) == (18, 2048, 16384, 257152)
    assert (expert.n_layers, expert.d_model, expert.d_mlp, expert.unembedding) == (18, 1024, 4096, None)
    assert policy.spec.image_keys == {"image": (224, 224, 3)} and policy.spec.chunk_length == 50


# -- serving: directions on either stack through one policy node ---------------------------------------


def test_policy_node_steers_and_records_the_action_expert(policy):
    from vla_steer.core.discovery.direction import Direction, DirectionNeuron
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Client, Server

    expert = Direction(
        "careful", "care", [DirectionNeuron(0, 3), DirectionNeuron(1, 5)], {"backbone": "action_expert"}
    )
    language = Direction("fast", "speed", [DirectionNeuron(1, 9)])
    node = PolicyNode(policy, [expert, language])
    assert set(node.steerers) == {"language", "action_expert"}
    obs = make_obs()
    payload = {"instruction": obs.instruction, "images": obs.images, "state": obs.state}
    with Server(node, "tcp://127.0.0.1:0").start() as server, Client(server.address) as client:
        assert set(client.hello().concepts) == {"careful", "fast"}

        def act(**kw):
            client.reset(episode="e", seed=0)  # the policy's seed: the same noise every time
            return client.infer(payload, **kw)

        plain = act(activations=["careful", "fast"])
        assert plain.activations["careful"].shape[1] == 2 and plain.activations["fast"].shape[1] == 1
        client.set_knobs({"careful": 8.0})
        steered = act()
        assert (
            steered.info["steering"]["careful"]["enabled"] and not steered.info["steering"]["fast"]["enabled"]
        )
        assert np.abs(steered.actions - plain.actions).max() > 1e-3
        client.knobs_off()
        np.testing.assert_array_equal(act().actions, plain.actions)
    with pytest.raises(ValueError, match="backbone 'vision'"):
        PolicyNode(policy, [Direction("x", "x", [DirectionNeuron(0, 1)], {"backbone": "vision"})])
