"""pi0.5: a tiny model saved in the LeRobot and openpi checkpoint layouts, loaded through the real loader;
what differs from pi0 (state in the prompt, time through adaptive norms) and steering of both stacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pi0 import CHUNK, STATE_CORPUS, make_obs, noise_of, tiny_pi05_config, tiny_pi05_stats

from policies.pi0 import checkpoint as ckpt
from policies.pi0.config import PI0Architecture, read_config
from policies.pi0.inputs import discretize_state
from policies.pi0.policy import PI0Policy
from policies.pi05 import AdaRMSNorm, PI05Model, PI05Policy
from policies.pi05.policy import prompt_text
from policies.resolve import detect_kind, resolve_policy, stack_dims
from vla_steer.core import tiny
from vla_steer.core.steering import Steerer
from vla_steer.wire import Observation

PI0_REFERENCE = Path(__file__).parents[1] / "data" / "pi0_reference_layout.json"
OPENPI_KEYS = dict(openpi_image_keys=["observation.images.image", "observation.images.wrist_image"])


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(vocab_size=512, extra_words=["quickly", "slowly"], corpus=STATE_CORPUS)


@pytest.fixture(scope="module")
def built(tok):
    return PI05Policy.build(tiny_pi05_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_pi05_stats())


@pytest.fixture(scope="module")
def pi05_dir(built, tmp_path_factory):
    return built.save(tmp_path_factory.mktemp("pi05"))


@pytest.fixture
def policy(pi05_dir):
    """A fresh load per test (tests attach hooks)."""
    return PI05Policy.load(pi05_dir, seed=0)


# -- checkpoints -------------------------------------------------------------------------------------


def test_lerobot_layout_on_disk(pi05_dir):
    cfg = json.loads((pi05_dir / "config.json").read_text())
    assert cfg["type"] == "pi05" and cfg["normalization_mapping"]["STATE"] == "QUANTILES"
    from safetensors import safe_open

    with safe_open(str(pi05_dir / ckpt.WEIGHTS), "pt") as f:
        keys = set(f.keys())
    expert = "model.paligemma_with_expert.gemma_expert.model."
    assert {"model.time_mlp_in.weight", expert + "layers.1.input_layernorm.dense.weight",
            expert + "layers.0.post_attention_layernorm.dense.bias", expert + "norm.dense.weight"} <= keys  # fmt: skip
    assert not any("state_proj" in k or "action_time_mlp" in k or k.endswith("layernorm.weight") and expert in k
                   for k in keys)  # fmt: skip
    assert detect_kind(pi05_dir) == "pi05"


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_both_layouts_load_to_the_same_policy(built, tmp_path, layout):
    obs, noise = make_obs(), noise_of(1)
    path = built.save(tmp_path, layout=layout)
    if layout == "openpi":  # openpi's converter writes no variant: it is read from the weights' names
        assert "pi05" not in json.loads((path / "config.json").read_text())
        assert detect_kind(path) == "pi05"
        loaded = PI05Policy.load(path, **OPENPI_KEYS, num_inference_steps=3, n_action_steps=4)
        assert loaded.cfg.normalization["STATE"] == "QUANTILES" and loaded.cfg.tokenizer_max_length == 200
        tol = 1e-3  # openpi adds 1e-6 to the quantile span both ways (LeRobot: only where it is zero)
    else:
        loaded, tol = PI05Policy.load(path), 0.0
    want = built.infer(obs, noise=noise).actions
    got = loaded.infer(obs, noise=noise).actions
    assert got.shape == (4, 7)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    target = resolve_policy(path, **OPENPI_KEYS) if layout == "openpi" else resolve_policy(path)
    assert target.kind == "pi05"
    assert stack_dims(target) == {"language": (2, 128), "action_expert": (2, 64)}


def test_openpi_quantiles_add_eps_to_the_span_both_ways():
    n = ckpt.Normalizer("QUANTILES", {"q01": np.float32([0.0]), "q99": np.float32([2.0])}, 0.5, True)
    np.testing.assert_allclose(n.normalize(np.float32([2.5])), [2 * 2.5 / 2.5 - 1])
    np.testing.assert_allclose(n.unnormalize(np.float32([1.0])), [2.5])
    lerobot = ckpt.Normalizer("QUANTILES", {"q01": np.float32([0.0]), "q99": np.float32([2.0])}, 0.5)
    np.testing.assert_allclose(lerobot.normalize(np.float32([2.0])), [1.0])


def test_each_loader_refuses_the_other_variant(built, tok, tmp_path):
    pi05 = built.save(tmp_path / "pi05")
    with pytest.raises(ValueError, match="holds a pi05 checkpoint; load it as kind pi05"):
        PI0Policy.load(pi05)
    from tiny_pi0 import tiny_config, tiny_stats

    pi0 = PI0Policy.build(tiny_config(vocab_size=len(tok)), tok, seed=0, stats=tiny_stats()).save(
        tmp_path / "pi0"
    )
    with pytest.raises(ValueError, match="holds a pi0 checkpoint; load it as kind pi0"):
        PI05Policy.load(pi0)
    # an openpi config that says pi05: false over pi0.5 weights: the weights' names are the error
    openpi = built.save(tmp_path / "openpi", layout="openpi")
    config = json.loads((openpi / "config.json").read_text())
    (openpi / "config.json").write_text(json.dumps(config | {"pi05": False}))
    with pytest.raises(ckpt.CheckpointError, match="holds time_mlp_in \\(a pi05 checkpoint\\).*kind pi05"):
        PI0Policy.load(openpi, **OPENPI_KEYS)


def test_a_pi05_config_needs_a_state(tmp_path):
    path = tmp_path / "config.json"
    img = {"observation.images.image": {"type": "VISUAL", "shape": [3, 32, 32]}}
    path.write_text(json.dumps({"type": "pi05", "input_features": img,
                                "output_features": {"action": {"type": "ACTION", "shape": [7]}}}))  # fmt: skip
    with pytest.raises(ValueError, match="pi0.5 writes the state into its prompt"):
        read_config(path)


# -- the prompt --------------------------------------------------------------------------------------


def test_the_state_is_cut_into_256_bins_over_minus_one_to_one():
    normed = np.float32([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0])
    assert discretize_state(normed).tolist() == [-1, 0, 0, 128, 255, 255, 255]
    text = prompt_text("  pick_up the\nblock ", np.float32([-1.0, 0.0]))
    assert text == "Task: pick up the block, State: 0 128;\nAction: "


def test_prompt_is_bos_and_the_text_tokenised_in_one_piece(policy):
    obs = make_obs()
    normed = policy.normalized_state(obs)
    ids = policy.prompt_ids(obs.instruction, normed)
    text = prompt_text(obs.instruction, normed)
    assert ids == [policy.tokenizer.bos_token_id, *policy.tokenizer.encode(text, add_special_tokens=False)]
    assert policy.tokenizer.unk_token_id not in ids  # the bin numbers are words of the tokenizer
    inputs = policy.model_inputs(obs, noise_of(0))
    assert "state" not in inputs and inputs["tokens"][0].tolist() == ids
    with pytest.raises(ValueError, match="observation.state is required"):
        policy.model_inputs(Observation(obs.instruction, obs.images, None))


def test_the_state_reaches_the_actions_through_its_bins_only(policy):
    obs, noise = make_obs(), noise_of(2)
    base = policy.infer(obs, noise=noise).actions
    state = np.asarray(obs.state, np.float32)
    bins = discretize_state(policy.normalized_state(obs))
    for delta in (1e-4, -1e-4, 3e-5):  # a change inside every bin: the same prompt, the same actions
        nudged = Observation(obs.instruction, obs.images, state + delta)
        if (discretize_state(policy.normalized_state(nudged)) == bins).all():
            np.testing.assert_array_equal(policy.infer(nudged, noise=noise).actions, base)
            break
    else:
        pytest.fail("every nudge crossed a bin edge")
    moved = Observation(obs.instruction, obs.images, state + 0.5)
    assert np.abs(policy.infer(moved, noise=noise).actions - base).max() > 1e-4  # as pi0's prompt test


# -- the model ---------------------------------------------------------------------------------------


def test_adaptive_norm_is_rms_norm_with_scale_shift_and_gate():
    norm = AdaRMSNorm(4, 3, eps=1e-6)
    with torch.no_grad():
        norm.dense.weight.zero_()
        norm.dense.bias.copy_(torch.tensor([1.0] * 4 + [0.5] * 4 + [2.0] * 4))  # scale, shift, gate
    x = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]])
    out, gate = norm(x, torch.zeros(1, 3))
    rms = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, rms * 2.0 + 0.5)
    torch.testing.assert_close(gate, torch.full((1, 1, 4), 2.0))


def test_the_time_enters_the_expert_through_its_norms_and_there_is_no_state_token(policy):
    model = policy.model
    expert = model.paligemma_with_expert.expert
    assert all(isinstance(m, AdaRMSNorm) for layer in expert.layers
               for m in (layer.input_layernorm, layer.post_attention_layernorm))  # fmt: skip
    assert isinstance(expert.norm, AdaRMSNorm) and not hasattr(model, "state_proj")
    inputs = policy.model_inputs(make_obs(), noise_of(0))
    with torch.no_grad():
        embs, pad, ar, cond = model.embed_suffix(None, inputs["noise"], torch.ones(1))
        assert embs.shape == (1, CHUNK, 32) and cond.shape == (1, 32)
        assert ar[0].tolist() == [True] + [False] * (CHUNK - 1)
        torch.testing.assert_close(embs, model.action_in_proj(inputs["noise"]))  # no time in the tokens
        cache = model.fill_prefix_cache(
            *model.embed_prefix(
                inputs["images"], inputs["image_masks"], inputs["tokens"], inputs["token_mask"]
            )
        )
        v1 = model.denoise_step(cache, None, inputs["noise"], torch.ones(1))
        v_half = model.denoise_step(cache, None, inputs["noise"], torch.full((1,), 0.5))
    assert np.abs((v1 - v_half).numpy()).max() > 1e-3


def test_full_size_names_and_shapes_are_openpis_pi05():
    """pi0's reference names (tests/data/pi0_reference_layout.json) with openpi's pi0.5 changes: no
    state_proj, time_mlp_in/out (width x width), adaptive expert norms (dense: width -> 3 x width)."""
    ref = json.loads(PI0_REFERENCE.read_text())
    want = {}
    for key, shape in ref["openpi_keys"].items():
        keys = [key.format(i=i) for i in range(ref["ranges"]["i"])] if "{i}" in key else [key]
        keys = [k.format(j=j) for k in keys for j in range(ref["ranges"]["j"])] if "{j}" in key else keys
        want |= dict.fromkeys(keys, tuple(shape))
    w = 1024
    for key in [k for k in want if k.startswith(("state_proj.", "action_time_mlp_"))]:
        del want[key]
    want |= {"time_mlp_in.weight": (w, w), "time_mlp_in.bias": (w,), "time_mlp_out.weight": (w, w),
             "time_mlp_out.bias": (w,)}  # fmt: skip
    expert = "paligemma_with_expert.gemma_expert.model."
    for key in [k for k in want if k.startswith(expert) and k.endswith("norm.weight")]:
        del want[key]
        want |= {
            key.replace(".weight", ".dense.weight"): (3 * w, w),
            key.replace(".weight", ".dense.bias"): (3 * w,),
        }
    with torch.device("meta"):
        model = PI05Model(PI0Architecture())
    assert {k: tuple(v.shape) for k, v in ckpt.unique_state(model).items()} == want
    current = {"model." + k: torch.empty(0) for k in want}
    assert set(ckpt.to_module_keys(current, variant="pi05")) == set(model.state_dict())


# -- steering ----------------------------------------------------------------------------------------


def test_backbones(policy, tok):
    lang, expert = policy.backbones["language"], policy.backbones["action_expert"]
    assert policy.backbone is lang
    assert (lang.n_layers, lang.d_mlp, lang.vocab_size) == (2, 128, len(tok))
    assert (expert.n_layers, expert.d_mlp, expert.unembedding, expert.norm_gain) == (2, 64, None, None)


@pytest.mark.parametrize("stack", ["language", "action_expert"])
def test_steering_changes_actions_and_unsteered_is_bit_identical(policy, stack):
    obs, noise = make_obs(), noise_of(7)
    plain = policy.infer(obs, noise=noise).actions
    steerer = Steerer(policy.backbones[stack])
    steerer.add("probe", [(0, 3), (1, 5), (1, 9)], mode="clamp", strength=8.0, enabled=False)
    np.testing.assert_array_equal(policy.infer(obs, noise=noise).actions, plain)
    with steerer.apply(probe=8.0):
        steered = policy.infer(obs, noise=noise).actions
    assert np.abs(steered - plain).max() > 1e-3
    steerer.remove()
    np.testing.assert_array_equal(policy.infer(obs, noise=noise).actions, plain)


@pytest.mark.parametrize(("stack", "calls"), [("language", 1), ("action_expert", 3)])
def test_steering_holds_at_every_prefill_position_and_flow_step(policy, stack, calls):
    """One inference = one prefix pass + 3 flow steps: the clamped neuron reads 8.0 at every position of
    every call of its layer (a pre-hook registered after the Steerer's sees what down_proj gets)."""
    bb = policy.backbones[stack]
    steerer = Steerer(bb)
    steerer.add("probe", [(1, 5)], mode="clamp", strength=8.0)
    seen = []
    down = bb.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., 5].clone()))
    obs = make_obs()
    policy.infer(obs, noise=noise_of(3))
    handle.remove()
    steerer.remove()
    assert len(seen) == calls
    n_prefix = 2 * 16 + len(policy.prompt_ids(obs.instruction, policy.normalized_state(obs)))
    assert [s.shape[1] for s in seen] == ([n_prefix] if stack == "language" else [CHUNK] * calls)
    assert all(bool((s == 8.0).all()) for s in seen)


def test_one_inference_is_one_forward_of_the_steered_root(policy):
    root = policy.backbones["action_expert"].root
    assert root is policy.backbones["language"].root is policy.model
    calls = []
    handle = root.register_forward_pre_hook(lambda *a: calls.append(1))
    policy.infer(make_obs(), noise=noise_of(0))
    handle.remove()
    assert calls == [1]


def test_the_command_refuses_a_kind_the_checkpoint_contradicts(pi05_dir):
    """`vla-steer discover <pi0.5 dir> --kind pi0`: refused before any weights load, naming both kinds."""
    import subprocess

    from support import VLA_STEER

    r = subprocess.run([VLA_STEER, "discover", str(pi05_dir), "--kind", "pi0"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode != 0
    assert "holds a checkpoint of kind pi05, but --kind pi0 was given" in r.stderr


def test_batched_inference_equals_each_observation_alone(policy):
    """`serve --batch-max`: observations whose prompts (state bins included) have one length share a forward."""
    a = make_obs(seed=1)
    b = Observation(a.instruction, make_obs(seed=2).images, np.asarray(a.state) * 0.5)
    assert policy.batch_key(a) == len(policy.prompt_ids(a.instruction, policy.normalized_state(a)))
    if policy.batch_key(b) != policy.batch_key(a):
        b = Observation(a.instruction, b.images, a.state)
    got = policy.infer_batch([a, b], [torch.Generator().manual_seed(s) for s in (5, 6)])
    for obs, seed, chunk in zip((a, b), (5, 6), got, strict=True):
        noise = torch.randn(CHUNK, 10, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_allclose(
            chunk.actions, policy.infer(obs, noise=noise).actions, rtol=1e-4, atol=1e-5
        )
