"""Cost of live steering on a forward pass, against the unhooked model and a "paper-style" hook.

Model: a Llama-shaped causal LM (hidden 768, MLP 2048, 12 layers, 12 heads, vocab 32000: ~134M
parameters) with random weights, float32, eval mode, under torch.no_grad, on a fixed batch of
1 x 64 token ids, with the default number of torch threads.

Three modes, timed interleaved in one process (A B C, B C A, C A B, ... after warm-up rounds):

  base   the unhooked forward;
  ours   vla_steer's Steerer with one active clamp concept: 20 neurons in each of 8 layers set to
         sign * strength (a forward pre-hook on down_proj rewrites its input once);
  paper  the straightforward implementation: a forward hook on down_proj that clones its input,
         overwrites the same neuron columns with the same values, and returns
         F.linear(modified, weight, bias), i.e. down_proj is computed twice.

Hooks are installed in each measurement's untimed setup and removed in its teardown, so the modes
never stack (checked). Before timing, the benchmark checks that steering is not a no-op (ours
changes the logits) and that both hooks compute the same thing (paper ~= ours).

Headline: median(ours) / median(base), target <= 1.02.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    Case,
    arg_parser,
    bootstrap_ratio_ci,
    interleaved,
    load_average,
    machine,
    median,
    meets_target,
    summary,
    write_result,
)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from vla_steer.core.backbone import Backbone  # noqa: E402
from vla_steer.core.steering import Steerer  # noqa: E402

NAME = "steering_overhead"
TARGET = 1.02

CONFIG = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32000,
    max_position_embeddings=2048,
)
SEQ_LEN = 64
STEERED_LAYERS = list(range(2, 10))  # 8 layers in the middle of the 12
NEURONS_PER_LAYER = 20
STRENGTH = 5.0
SEED = 0


def build_model() -> tuple[LlamaForCausalLM, int]:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval().float()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params < 100_000_000:
        raise AssertionError(f"benchmark model has {n_params:,} parameters; it must have >= 100M")
    return model, n_params


def choose_neurons(d_mlp: int) -> list[tuple[int, int, float]]:
    g = torch.Generator().manual_seed(SEED + 1)
    neurons = []
    for layer in STEERED_LAYERS:
        idx = torch.randperm(d_mlp, generator=g)[:NEURONS_PER_LAYER].tolist()
        signs = (torch.randint(0, 2, (NEURONS_PER_LAYER,), generator=g) * 2 - 1).tolist()
        neurons += [(layer, i, float(s)) for i, s in zip(idx, signs, strict=True)]
    return neurons


class PaperHooks:
    """The reference implementation: overwrite coefficients after the fact and recompute down_proj."""

    def __init__(self, backbone: Backbone, neurons: list[tuple[int, int, float]], strength: float):
        self.backbone = backbone
        self.per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in sorted({n[0] for n in neurons}):
            idx = [i for (lay, i, _) in neurons if lay == layer]
            val = [s * strength for (lay, _, s) in neurons if lay == layer]
            self.per_layer[layer] = (torch.tensor(idx), torch.tensor(val))
        self.handles = []

    def attach(self) -> None:
        for layer, (idx, val) in self.per_layer.items():

            def hook(module, args, output, idx=idx, val=val):
                modified = args[0].clone()
                modified[..., idx] = val.to(modified.dtype)
                return F.linear(modified, module.weight, module.bias)

            self.handles.append(self.backbone.down_proj(layer).register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def main() -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    reps, warmup, max_rounds, time_limit = (8, 2, 16, 25.0) if args.quick else (60, 3, 120, 180.0)
    load_start = load_average()

    model, n_params = build_model()
    backbone = Backbone.from_model(model)
    neurons = choose_neurons(backbone.d_mlp)
    ids = torch.randint(
        0, CONFIG["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(SEED + 2)
    )
    print(
        f"{NAME}: Llama-shaped model, {n_params / 1e6:.1f}M parameters, input 1x{SEQ_LEN}; "
        f"clamp {NEURONS_PER_LAYER} neurons x {len(STEERED_LAYERS)} layers at {STRENGTH}",
        file=sys.stderr,
    )

    steerer = Steerer(backbone)
    steerer.add("bench", neurons, mode="clamp", strength=STRENGTH)
    steerer.remove()
    paper = PaperHooks(backbone, neurons, STRENGTH)
    baseline_hooks = n_hooks(model)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def expect_hooks(extra: int):
        def check():
            if n_hooks(model) != baseline_hooks + extra:
                raise AssertionError(
                    f"hooks stacked: {n_hooks(model) - baseline_hooks} installed, expected {extra}"
                )

        return check

    n_ours = len(STEERED_LAYERS) + 2  # one pre-hook per steered down_proj + the root lock guards
    n_paper = len(STEERED_LAYERS)

    def setup_base():
        expect_hooks(0)()

    def setup_ours():
        steerer.attach()
        expect_hooks(n_ours)()

    def setup_paper():
        paper.attach()
        expect_hooks(n_paper)()

    # -- sanity: the steered forward is not a no-op, and both implementations agree ------------------
    setup_base()
    logits_base = forward()
    setup_ours()
    logits_ours = forward()
    steerer.remove()
    setup_paper()
    logits_paper = forward()
    paper.remove()
    setup_base()
    logits_after = forward()
    ours_vs_base = (logits_ours - logits_base).abs().max().item()
    paper_vs_ours = (logits_paper - logits_ours).abs().max().item()
    if not ours_vs_base > 1e-2:
        raise AssertionError(
            f"steering did not change the logits (max |diff| {ours_vs_base:.3g}): a no-op benchmark"
        )
    if not torch.allclose(logits_paper, logits_ours, rtol=1e-3, atol=1e-3):
        raise AssertionError(f"paper-style hook and Steerer disagree (max |diff| {paper_vs_ours:.3g})")
    if not torch.equal(logits_after, logits_base):
        raise AssertionError("removing the hooks did not restore the unhooked model exactly")
    sanity = {
        "ours_changes_logits_max_abs": ours_vs_base,
        "paper_vs_ours_max_abs": paper_vs_ours,
        "paper_equals_ours_allclose(rtol=1e-3,atol=1e-3)": True,
        "removed_equals_base_exactly": True,
    }

    # -- timing -----------------------------------------------------------------------------------------
    timings = interleaved(
        {
            "base": Case(forward, setup_base),
            "ours": Case(forward, setup_ours, teardown=steerer.remove),
            "paper": Case(forward, setup_paper, teardown=paper.remove),
        },
        reps=reps,
        warmup=warmup,
        max_rounds=max_rounds,
        time_limit_s=time_limit,
    )
    expect_hooks(0)()
    times = timings.clean()
    everything = timings.all_times()

    med = {k: median(v) for k, v in times.items()}
    ratio = med["ours"] / med["base"]
    paper_ratio = med["paper"] / med["base"]
    paired_ours = median([o / b for o, b in zip(times["ours"], times["base"], strict=True)])
    paired_paper = median([p / b for p, b in zip(times["paper"], times["base"], strict=True)])
    ci_ours = bootstrap_ratio_ci(times["ours"], times["base"])
    ci_paper = bootstrap_ratio_ci(times["paper"], times["base"])

    result = {
        "name": NAME,
        "value": ratio,
        "unit": "ratio",
        "target": TARGET,
        "better": "lower",
        "quick": args.quick,
        "description": "median forward time with the Steerer clamping 20 neurons in each of 8 layers, "
        "divided by the median unhooked forward time",
        "machine": machine("cpu"),
        "ci95": {"value": ci_ours, "paper_hook_ratio": ci_paper},
        "paper_hook_ratio": paper_ratio,
        "ours_faster_than_paper": med["ours"] < med["paper"],
        "paired_ratio_median": {"ours": paired_ours, "paper": paired_paper},
        "median_s": med,
        "median_all_rounds_s": {k: median(v) for k, v in everything.items()},
        "summary_s": {k: summary(v) for k, v in times.items()},
        "params": n_params,
        "config": {**CONFIG, "dtype": "float32", "batch": 1, "seq_len": SEQ_LEN, "use_cache": False},
        "steering": {
            "layers": STEERED_LAYERS,
            "neurons_per_layer": NEURONS_PER_LAYER,
            "mode": "clamp",
            "strength": STRENGTH,
            "positions": "all",
        },
        "protocol": {
            "reps": reps,
            "warmup_rounds": warmup,
            "order": "interleaved, rotated each round",
            "hooks": "installed in untimed setup, removed in untimed teardown (count checked each run)",
            "rounds": len(timings.rounds),
            "clean_rounds": timings.n_clean(),
            "statistics": f"medians over clean rounds (every case within {timings.tol}x its fastest run); "
            "more rounds are run while fewer than reps are clean",
        },
        "conditions": {"loadavg_start": load_start, "loadavg_end": load_average()},
        "sanity": sanity,
        "raw": timings.raw(),
    }
    result["meets_target"] = meets_target(result)
    path = write_result(result, args.out)

    print(
        f"{NAME}{' (quick)' if args.quick else ''}: {n_params / 1e6:.1f}M params, "
        f"{timings.n_clean()} clean of {len(timings.rounds)} interleaved rounds"
    )
    print(
        f"  median forward  base {med['base'] * 1e3:.2f} ms | ours {med['ours'] * 1e3:.2f} ms | "
        f"paper {med['paper'] * 1e3:.2f} ms"
    )
    print(
        f"  ours / base  = {ratio:.4f}  (target <= {TARGET}; {'met' if result['meets_target'] else 'NOT met'}); "
        f"95% CI [{ci_ours[0]:.4f}, {ci_ours[1]:.4f}]; paired median {paired_ours:.4f}"
    )
    print(
        f"  paper / base = {paper_ratio:.4f} (95% CI [{ci_paper[0]:.4f}, {ci_paper[1]:.4f}]); ours faster than paper: {result['ours_faster_than_paper']}"
    )
    if timings.n_clean() < reps:
        print(
            f"  WARNING: only {timings.n_clean()} of {len(timings.rounds)} rounds ran without contention "
            f"(load average {load_average()}); the figures are noisier than usual"
        )
    print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
