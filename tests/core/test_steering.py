"""The Steerer: exactness against a recompute reference, identity when off, compile and threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from vla_steer.core.steering import MAX_ACTIVATION, MAX_GAIN, Neuron, Steerer, strength_bound

NEURONS = [Neuron(0, 3), Neuron(0, 17, -1.0), Neuron(2, 5), Neuron(3, 40, -1.0)]


@pytest.fixture
def ids(llama):
    return llama.tokenizer("pick up the red block quickly", return_tensors="pt").input_ids


def logits(bb, ids):
    with torch.no_grad():
        return bb.root(ids).logits


def recompute_reference(bb, ids, edit):
    """The paper's way: a forward hook that edits the coefficients and runs down_proj again."""
    handles = []
    by_layer: dict[int, list[Neuron]] = {}
    for n in NEURONS:
        by_layer.setdefault(n.layer, []).append(n)
    for layer, neurons in by_layer.items():

        def hook(module, args, output, neurons=neurons):
            m = args[0].clone()
            for n in neurons:
                m[..., n.index] = edit(m[..., n.index], n)
            return F.linear(m, module.weight, module.bias)

        handles.append(bb.down_proj(layer).register_forward_hook(hook))
    try:
        return logits(bb, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    ("mode", "edit"),
    [
        ("clamp", lambda m, n: torch.full_like(m, n.sign * 3.5)),
        ("add", lambda m, n: m + n.sign * 3.5),
        ("scale", lambda m, n: m * 3.5),
    ],
)
def test_modes_equal_replace_and_recompute(llama, ids, mode, edit):
    expected = recompute_reference(llama, ids, edit)
    with Steerer(llama) as steerer:
        steerer.add("c", NEURONS, mode=mode, strength=3.5)
        got = logits(llama, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(llama, ids))  # and it really changed something


def test_off_and_removed_are_bit_identical_to_unhooked(llama, ids):
    base = logits(llama, ids)
    steerer = Steerer(llama)
    steerer.add("c", NEURONS, strength=8.0)
    steerer.add("d", [(1, 2)], mode="scale", strength=0.0)
    assert not torch.equal(logits(llama, ids), base)
    steerer.off()
    assert steerer.hooked_layers == [0, 1, 2, 3]
    assert torch.equal(logits(llama, ids), base)
    steerer.enable("c")
    steerer.disable("c")
    assert torch.equal(logits(llama, ids), base)
    steerer.remove()
    assert torch.equal(logits(llama, ids), base)
    assert all(not llama.down_proj(i)._forward_pre_hooks for i in range(llama.n_layers))
    assert not llama.root._forward_pre_hooks and not llama.root._forward_hooks


def test_one_hook_per_layer_whatever_the_number_of_concepts(llama):
    steerer = Steerer(llama)
    steerer.add("a", [(1, 1), (1, 2)])
    steerer.add("b", [(1, 3)])
    steerer.add("c", [(1, 4), (2, 0)])
    assert len(llama.down_proj(1)._forward_pre_hooks) == 1
    assert len(llama.down_proj(2)._forward_pre_hooks) == 1
    steerer.remove()


def test_several_concepts_compose(llama, ids):
    def edit(m, n):
        return m * 2.0 + (1.5 if n.layer == 0 else 0.0)

    expected = recompute_reference(llama, ids, edit)
    with Steerer(llama) as steerer:
        steerer.add("gain", NEURONS, mode="scale", strength=2.0)
        steerer.add("shift", [(n.layer, n.index) for n in NEURONS if n.layer == 0], mode="add", strength=1.5)
        torch.testing.assert_close(logits(llama, ids), expected, rtol=1e-5, atol=1e-5)


def test_last_position_only(llama, ids):
    base = logits(llama, ids)
    with Steerer(llama, positions="last") as steerer:
        steerer.add("c", NEURONS, strength=6.0)
        last = logits(llama, ids)
    # Causal attention: earlier positions never see the last token, so they are untouched.
    assert torch.equal(last[:, :-1], base[:, :-1])
    assert not torch.allclose(last[:, -1], base[:, -1])
    with Steerer(llama, positions="all") as steerer:
        steerer.add("c", NEURONS, strength=6.0)
        everywhere = logits(llama, ids)
        assert not torch.allclose(everywhere[:, 0], base[:, 0])
        steerer.set_positions("last")  # switched live: the hooks are re-installed, one per layer
        assert torch.equal(logits(llama, ids), last)
        assert all(len(llama.down_proj(n.layer)._forward_pre_hooks) == 1 for n in NEURONS)


def test_plan_positions_steer_only_while_the_policy_decides_its_plan(llama, ids):
    base = logits(llama, ids)
    with Steerer(llama, positions="last") as steerer:
        steerer.add("c", NEURONS, strength=6.0)
        last = logits(llama, ids)
    with pytest.raises(ValueError, match="says no plan"):
        Steerer(llama, positions="plan")  # a plain Llama says no plan
    llama.plans = True
    with Steerer(llama, positions="plan") as steerer:
        steerer.add("c", NEURONS, strength=6.0)
        assert torch.equal(logits(llama, ids), base)  # a forward that decides no plan word: untouched
        llama.planning = True
        assert torch.equal(logits(llama, ids), last)  # one that does: its last position, as "last" steers
        llama.planning = False
        steerer.set_positions("all")
        assert not torch.allclose(logits(llama, ids), base)
    llama.plans = False
    with Steerer(llama) as steerer, pytest.raises(ValueError, match="says no plan"):
        steerer.set_positions("plan")


def test_steering_applies_to_every_decoded_token(llama, ids):
    """generate() with the KV cache: the prefill and each 1-token step are steered."""
    base = llama.root.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with Steerer(llama, positions="last") as steerer:
        steerer.add("c", NEURONS, strength=40.0)
        steered = llama.root.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        calls = []
        h = llama.down_proj(0).register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[-2]))
        llama.root.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        h.remove()
    assert calls == [ids.shape[1], 1, 1]
    assert not torch.equal(base, steered)


def test_context_manager_restores_settings(llama, ids):
    steerer = Steerer(llama)
    steerer.add("c", NEURONS, strength=2.0, enabled=False)
    base = logits(llama, ids)
    with steerer.apply(c=5.0):
        assert steerer.state()["c"] == {**steerer.state()["c"], "strength": 5.0, "enabled": True}
        inside = logits(llama, ids)
    assert not torch.equal(inside, base)
    assert steerer.state()["c"]["strength"] == 2.0 and not steerer.state()["c"]["enabled"]
    assert torch.equal(logits(llama, ids), base)
    steerer.remove()


def test_bad_input_is_rejected_with_a_clear_error(llama):
    steerer = Steerer(llama)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        steerer.add("x", [(9, 0)])
    with pytest.raises(ValueError, match="neuron 100000 out of range"):
        steerer.add("x", [(0, 100000)])
    with pytest.raises(ValueError, match="mode must be one of"):
        steerer.add("x", [(0, 1)], mode="boost")
    with pytest.raises(ValueError, match="no neurons"):
        steerer.add("x", [])
    steerer.add("x", [(0, 1)])
    with pytest.raises(ValueError, match="already registered"):
        steerer.add("x", [(0, 2)])
    with pytest.raises(KeyError, match="unknown concept 'y'"):
        steerer.set("y", 1.0)
    with pytest.raises(ValueError, match="finite"):
        steerer.set("x", float("nan"))
    with pytest.raises(ValueError, match="positions"):
        steerer.set_positions("first")
    steerer.remove()


def test_strength_changes_under_torch_compile_never_recompile(llama, ids):
    """100 knob changes: zero recompiles, and each one shows in the very next output."""
    steerer = Steerer(llama)
    steerer.add("c", NEURONS, strength=0.0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(llama.root, backend="eager")
    outputs = []
    with torch.no_grad():
        compiled(ids)  # first call compiles
        frames = counters["stats"]["unique_graphs"]
        for i in range(100):
            steerer.set("c", 0.25 * (i + 1), mode="clamp" if i % 2 else "add")
            outputs.append(compiled(ids).logits)
            if i == 50:
                steerer.off()
                outputs.append(compiled(ids).logits)
                steerer.enable("c")
    assert counters["stats"]["unique_graphs"] == frames, dict(counters["stats"])
    assert not counters["recompiles"]
    # Each setting gives its own output, equal to the eager model at that setting.
    assert len({o.sum().item() for o in outputs}) == len(outputs)
    steerer.set("c", 7.0, mode="clamp")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, llama.root(ids).logits)
    steerer.remove()
    torch._dynamo.reset()


def test_concurrent_set_never_mixes_settings_within_a_forward(llama, ids):
    """A second thread flips strengths as fast as it can; every forward sees one whole setting."""
    steerer = Steerer(llama)
    steerer.add("a", [(0, 3), (3, 40)], strength=5.0)
    steerer.add("b", [(1, 7), (2, 5)], strength=-5.0)
    settings = {0: (5.0, -5.0), 1: (-5.0, 5.0)}
    expected = {}
    for key, (a, b) in settings.items():
        steerer.set("a", a)
        steerer.set("b", b)
        expected[key] = logits(llama, ids)
    assert not torch.equal(expected[0], expected[1])
    stop = threading.Event()
    flips = [0]

    def flipper():
        while not stop.is_set():
            a, b = settings[flips[0] % 2]
            steerer.update({"a": a, "b": b})
            flips[0] += 1

    t = threading.Thread(target=flipper)
    t.start()
    try:
        for _ in range(60):
            out = logits(llama, ids)
            assert torch.equal(out, expected[0]) or torch.equal(out, expected[1])
    finally:
        stop.set()
        t.join()
    assert flips[0] > 5  # the other thread really did interleave
    steerer.remove()


@pytest.mark.slow
def test_strength_changes_never_recompile_with_inductor(llama, ids):
    """The same guarantee with the default (inductor) backend, which generates and compiles C++."""
    steerer = Steerer(llama)
    steerer.add("c", NEURONS, strength=1.0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(llama.root)
    with torch.no_grad():
        compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        for strength in (2.0, -3.0, 9.0):
            steerer.set("c", strength)
            torch.testing.assert_close(compiled(ids).logits, llama.root(ids).logits, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    steerer.remove()
    torch._dynamo.reset()


def test_gemma_backbone_steers_exactly_and_turns_off_exactly(gemma):
    ids = gemma.tokenizer("lift the cube high", return_tensors="pt").input_ids
    neurons = [Neuron(0, 1), Neuron(2, 7, -1.0)]
    base = logits(gemma, ids)

    def hook(module, args, output, idx):
        m = args[0].clone()
        m[..., idx] = 4.0 if idx == 1 else -4.0
        return F.linear(m, module.weight, module.bias)

    handles = [
        gemma.down_proj(n.layer).register_forward_hook(lambda mod, a, o, i=n.index: hook(mod, a, o, i))
        for n in neurons
    ]
    expected = logits(gemma, ids)
    for h in handles:
        h.remove()
    with Steerer(gemma) as steerer:
        steerer.add("c", neurons, strength=4.0)
        torch.testing.assert_close(logits(gemma, ids), expected, rtol=1e-5, atol=1e-5)
        steerer.off()
        assert torch.equal(logits(gemma, ids), base)


def test_a_knob_change_never_waits_for_a_running_inference(llama, ids):
    """An inference holds one setting from start to end; a change made meanwhile returns at once
    and applies at the next forward."""
    steerer = Steerer(llama)
    steerer.add("c", NEURONS, strength=5.0)
    before = logits(llama, ids)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def inference():
        with steerer.consistent():
            inside.set()
            assert release.wait(30)
            seen["during"] = logits(llama, ids)  # a forward after the change was made

    t = threading.Thread(target=inference)
    t.start()
    try:
        assert inside.wait(30)
        steerer.set("c", -5.0)  # would deadlock here if set() waited for the inference
        assert steerer.state()["c"]["strength"] == -5.0
        assert steerer.applied_state()["c"]["strength"] == 5.0
    finally:
        release.set()
        t.join(30)
    assert torch.equal(seen["during"], before)  # the running inference kept its setting
    after = logits(llama, ids)
    assert not torch.equal(after, before) and steerer.applied_state()["c"]["strength"] == -5.0
    steerer.remove()


def test_settings_change_all_or_nothing(llama):
    steerer = Steerer(llama)
    steerer.add("a", [(0, 1)], strength=1.0, enabled=False)
    steerer.add("b", [(1, 1)], strength=2.0, enabled=False)
    before = steerer.state()
    with pytest.raises(ValueError, match="finite"):
        steerer.update({"a": 5.0, "b": float("nan")})
    with pytest.raises(KeyError, match="nope"), steerer.apply(a=9.0, nope=1.0):
        pass
    assert steerer.state() == before  # nothing half-applied, nothing left enabled
    with steerer.batch():
        steerer.set("a", 3.0)
        steerer.enable("b")
        with pytest.raises(RuntimeError, match="inside Steerer.batch"):
            steerer.add("c", [(2, 2)])  # would wait for a forward while holding the settings lock
    assert steerer.state()["a"]["strength"] == 3.0 and steerer.state()["b"]["enabled"]
    steerer.remove()


@pytest.mark.parametrize(
    ("neuron", "message"),
    [((1.0, 2), "integer layer and index"), ((1, 2, "1"), "finite, non-zero sign"), ((True, 2), "integer")],
)
def test_malformed_neurons_are_refused_before_anything_is_registered(llama, neuron, message):
    steerer = Steerer(llama)
    with pytest.raises(ValueError, match=message):
        steerer.add("c", [(0, 1), neuron])
    assert steerer.concepts == [] and steerer.hooked_layers == []


@pytest.mark.parametrize(
    ("mode", "largest", "refused"),
    [("clamp", MAX_ACTIVATION, 1e30), ("add", -MAX_ACTIVATION, 1e39), ("scale", MAX_GAIN, 101.0)],
)
def test_strengths_beyond_the_mode_bound_are_refused_and_change_nothing(llama, ids, mode, largest, refused):
    steerer = Steerer(llama)
    steerer.add("a", [(0, 1), (2, 5, -1.0)], mode=mode, strength=1.0)
    steerer.set("a", largest)  # the bound itself is a legal setting, and the model stays finite under it
    assert torch.isfinite(logits(llama, ids)).all()
    before = steerer.state()
    for bad in (refused, -refused, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="'a'"):
            steerer.set("a", bad)
        with pytest.raises(ValueError, match="'a'"):
            steerer.update({"a": bad}, enable=True)
    with pytest.raises(ValueError, match=f"out of range for mode '{mode}'"):
        steerer.set("a", refused)
    assert steerer.state() == before and steerer.applied_state() == before
    with pytest.raises(ValueError, match="out of range"):
        steerer.add("b", [(1, 1)], mode=mode, strength=refused)
    assert steerer.concepts == ["a"]
    steerer.remove()


def test_the_bound_follows_the_hook_dtype():
    assert strength_bound("clamp", torch.float32) == strength_bound("add", torch.bfloat16) == MAX_ACTIVATION
    # float16 holds at most 65504: the clamp/add bound keeps a 64x margin below it.
    assert strength_bound("clamp", torch.float16) == torch.finfo(torch.float16).max / 64
    assert strength_bound("scale", torch.float16) == MAX_GAIN
    with pytest.raises(ValueError, match="mode must be one of"):
        strength_bound("boost")


def test_switching_mode_checks_the_strength_against_the_new_mode(llama):
    steerer = Steerer(llama)
    steerer.add("a", [(0, 1)], mode="clamp", strength=500.0)
    with pytest.raises(ValueError, match="mode 'scale'"):
        steerer.set("a", 500.0, mode="scale")
    assert steerer.state()["a"]["mode"] == "clamp"
    steerer.remove()


def test_overlapping_concepts_are_bounded_together(llama):
    """Offsets add and gains multiply on a shared neuron: the bound holds for what the neuron ends at."""
    steerer = Steerer(llama)
    steerer.add("a", [(0, 1)], mode="add", strength=0.6 * MAX_ACTIVATION)
    steerer.add("b", [(0, 1), (0, 2)], mode="add", strength=0.6 * MAX_ACTIVATION, enabled=False)
    with pytest.raises(ValueError, match=r"\['a', 'b'\] together steer neuron 1 of layer 0"):
        steerer.enable("b")
    assert not steerer.state()["b"]["enabled"]
    with pytest.raises(ValueError, match="together"):
        steerer.add("c", [(0, 1)], mode="add", strength=0.6 * MAX_ACTIVATION)
    assert "c" not in steerer.concepts
    steerer.add("g", [(1, 1)], mode="scale", strength=MAX_GAIN)
    with pytest.raises(ValueError, match="gain"):
        steerer.add("h", [(1, 1)], mode="scale", strength=2.0)
    steerer.disable("a")
    steerer.enable("b")  # fine once they no longer overlap
    steerer.remove()


def test_a_failed_batch_restores_every_setting_made_in_it(llama):
    steerer = Steerer(llama)
    steerer.add("a", [(0, 1)], strength=1.0, enabled=False)
    steerer.add("b", [(1, 1)], strength=2.0, enabled=False)
    before = steerer.state()
    with pytest.raises(ValueError, match="'b'"), steerer.batch():
        steerer.set("a", 7.0)
        steerer.enable("a")
        steerer.set("b", 1e39)
    assert steerer.state() == before and steerer.applied_state() == before
    # Inside a batch only the end state must be in bounds: lowering one knob and raising another works.
    steerer.add("c", [(0, 1)], mode="add", strength=0.9 * MAX_ACTIVATION)
    steerer.add("d", [(0, 1)], mode="add", strength=0.0)
    with steerer.batch():
        steerer.set("d", 0.9 * MAX_ACTIVATION)
        steerer.disable("c")
    assert steerer.state()["d"]["strength"] == 0.9 * MAX_ACTIVATION and not steerer.state()["c"]["enabled"]
    steerer.remove()
