"""Throughput of the vocabulary projection (`vla_steer.core.discovery.projection.project`) against plain matmul.

Model: a Llama-shaped causal LM built from a LlamaConfig with random weights, float32 (full run:
d_model 1024, d_mlp 4096, vocab 32000, 4 layers; --quick: 512 / 2048 / 16000 / 2). Only the
down_proj weights, the unembedding and the final-norm gain take part in the projection.

Timed, interleaved in one process (after one untimed run of each, the projection's doubling as a
correctness check against the plain matmul):

  project    project(backbone, k=20, progress=False, device="cpu", memory_budget=1 GiB), end to end
             (tiled matmuls, top/bottom-k selection and merges, the exact re-scoring of the winners);
  reference  plain torch.matmul of the full problem per layer: a contiguous float32
             [d_mlp, d_model] @ [d_model, vocab] (the value vectors against the gain-folded
             unembedding), output freshly allocated and dropped each layer, as a user would write it.
             With the default budget the Tiling cuts these shapes into exactly one block per layer,
             so the reference has the same block shape as the projection's matmuls (recorded in
             `tiling` / `reference`).

Both do 2 * n_layers * d_mlp * vocab * d_model floating-point operations of matmul; the headline is
projection FLOP/s / matmul FLOP/s (= median reference time / median projection time), target >= 0.5.

Peak extra memory of project() is measured in a fresh subprocess (so earlier allocations, the
reference matmul's included, cannot mask it): the RSS high-water mark (VmHWM) is reset with
/proc/self/clear_refs after the model is built, and the increase over the resident size at that
point is reported next to Tiling.peak_bytes (the tiling's own bound) and the budget. Where
clear_refs is not writable it falls back to the ru_maxrss delta (a lower bound).

Also reported: the wall time the measured projection FLOP/s extrapolates to for Llama-2-7B and
PaliGemma on this machine (a rough figure: the selection and re-scoring costs do not scale exactly
with FLOPs, and a real model's bf16 weights add conversions).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
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
from vla_steer.core.discovery.projection import Tiling, project  # noqa: E402

NAME = "projection_throughput"
TARGET = 0.5
K = 20
BUDGET = 1 << 30
SEED = 0

SHAPES = {
    "full": dict(d_model=1024, d_mlp=4096, vocab=32000, n_layers=4, heads=16),
    "quick": dict(d_model=512, d_mlp=2048, vocab=16000, n_layers=2, heads=8),
}
EXTRAPOLATE = {
    "llama2_7b": dict(n_layers=32, d_mlp=11008, vocab=32000, d_model=4096),
    "paligemma": dict(n_layers=18, d_mlp=16384, vocab=257152, d_model=2048),
}


def flops(n_layers: int, d_mlp: int, vocab: int, d_model: int) -> float:
    return 2.0 * n_layers * d_mlp * vocab * d_model


def build_backbone(shape: dict) -> Backbone:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval().float()
    # RMSNorm gains start at exactly 1; perturb the final one so the gain folding is not an identity.
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    return Backbone.from_model(model)


# -- memory, in a fresh process ---------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(shape: dict, budget: int) -> dict:
    """Run once in a subprocess: peak extra resident memory of one project() call."""
    backbone = build_backbone(shape)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = _status_kib("VmHWM") is not None
    except OSError:
        reset = False
    project(backbone, k=K, progress=False, device="cpu", memory_budget=budget)
    if reset:
        method = "VmHWM after reset via /proc/self/clear_refs, minus VmRSS before project()"
        extra_kib = _status_kib("VmHWM") - rss_before
    else:
        method = "ru_maxrss delta (lower bound: model construction may have set the high-water mark)"
        extra_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    return {
        "peak_extra_bytes": extra_kib * 1024,
        "rss_before_bytes": (rss_before or 0) * 1024,
        "method": method,
    }


def measure_memory(shape: dict, budget: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        json.dumps({"shape": shape, "budget": budget}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- correctness ------------------------------------------------------------------------------------------


def check_projection(proj, ref_a: list[torch.Tensor], ref_b: torch.Tensor, n_check: int = 256) -> dict:
    """The projection's top/bottom-k logits must be those of the plain full matmul (first and last layer)."""
    worst = 0.0
    id_match = []
    for row in sorted({0, len(ref_a) - 1}):
        full = ref_a[row][:n_check] @ ref_b  # [n_check, vocab]
        top_v, top_i = torch.topk(full, K, dim=1)
        bot_v, bot_i = torch.topk(full, K, dim=1, largest=False)
        for got_v, got_i, want_v, want_i in (
            (proj.top_logit[row, :n_check], proj.top_ids[row, :n_check], top_v, top_i),
            (proj.bottom_logit[row, :n_check], proj.bottom_ids[row, :n_check], bot_v, bot_i),
        ):
            if not torch.allclose(got_v, want_v, rtol=1e-4, atol=1e-5):
                raise AssertionError(
                    f"projection disagrees with the plain matmul: max |diff| {(got_v - want_v).abs().max().item():.3g}"
                )
            worst = max(worst, (got_v - want_v).abs().max().item())
            id_match.append((got_i == want_i).float().mean().item())
    return {
        "checked_neurons_per_layer": n_check,
        "max_abs_logit_diff": worst,
        "min_id_match_fraction": min(id_match),
    }


# -- main --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-budget", type=int, default=BUDGET, help="bytes (default 1 GiB)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        spec = json.loads(args.memory_child)
        print(json.dumps(memory_child(spec["shape"], spec["budget"])))
        return 0

    variant = "quick" if args.quick else "full"
    shape = SHAPES[variant]
    reps, max_rounds, time_limit = (3, 5, 20.0) if args.quick else (5, 8, 120.0)
    load_start = load_average()
    budget = args.memory_budget
    n_layers, d_mlp, vocab, d_model = shape["n_layers"], shape["d_mlp"], shape["vocab"], shape["d_model"]
    total_flops = flops(n_layers, d_mlp, vocab, d_model)
    tiling = Tiling.for_budget(vocab, d_model, d_mlp, K, budget)
    print(
        f"{NAME}: {n_layers} layers x {d_mlp} neurons, vocab {vocab}, d_model {d_model} "
        f"({total_flops / 1e9:.1f} GFLOP); {tiling}",
        file=sys.stderr,
    )

    print("  measuring peak memory in a subprocess ...", file=sys.stderr, flush=True)
    memory = measure_memory(shape, budget)

    backbone = build_backbone(shape)
    # Reference operands: contiguous float32, built once outside the timing.
    ref_a = [backbone.value_vectors(i).T.float().contiguous() for i in range(n_layers)]  # [d_mlp, d_model]
    ref_b = backbone.effective_unembedding().T.contiguous()  # [d_model, vocab]

    def run_project():
        return project(backbone, k=K, progress=False, device="cpu", memory_budget=budget)

    def run_reference():
        for a in ref_a:
            out = torch.matmul(a, ref_b)
            del out

    with torch.no_grad():
        correctness = check_projection(run_project(), ref_a, ref_b)  # doubles as project's warm-up
        run_reference()  # and the reference's
        timings = interleaved(
            {"project": Case(run_project), "reference": Case(run_reference)},
            reps=reps,
            warmup=0,
            max_rounds=max_rounds,
            time_limit_s=time_limit,
        )
    times = timings.clean()

    med = {k: median(v) for k, v in times.items()}
    proj_fps = total_flops / med["project"]
    ref_fps = total_flops / med["reference"]
    ratio = proj_fps / ref_fps
    paired = median([r / p for r, p in zip(times["reference"], times["project"], strict=True)])
    ci = bootstrap_ratio_ci(times["reference"], times["project"])
    peak_model = tiling.peak_bytes(d_model, K)

    extrapolated = {}
    for name, s in EXTRAPOLATE.items():
        f = flops(**s)
        t = Tiling.for_budget(s["vocab"], s["d_model"], s["d_mlp"], K, budget)
        extrapolated[name] = {
            **s,
            "gflop": f / 1e9,
            "seconds_at_projection_flops": f / proj_fps,
            "seconds_at_matmul_flops": f / ref_fps,
            "tiling": {
                "vocab_tile": t.vocab_tile,
                "neuron_chunk": t.neuron_chunk,
                "peak_bytes": t.peak_bytes(s["d_model"], K),
            },
        }

    result = {
        "name": NAME,
        "value": ratio,
        "unit": "fraction",
        "target": TARGET,
        "better": "higher",
        "quick": args.quick,
        "description": "achieved FLOP/s of project(k=20) divided by plain torch.matmul FLOP/s on the same shapes",
        "ci95": ci,
        "paired_ratio_median": paired,
        "machine": machine("cpu"),
        "shape": {k: v for k, v in shape.items() if k != "heads"},
        "k": K,
        "memory_budget": budget,
        "tiling": {
            "vocab_tile": tiling.vocab_tile,
            "neuron_chunk": tiling.neuron_chunk,
            "blocks_per_layer": -(-vocab // tiling.vocab_tile) * -(-d_mlp // tiling.neuron_chunk),
        },
        "reference": "contiguous float32 [d_mlp, d_model] @ [d_model, vocab] per layer (full problem size; "
        "output allocated per call)",
        "flop_per_run": total_flops,
        "projection_flops": proj_fps,
        "matmul_flops": ref_fps,
        "median_s": med,
        "summary_s": {k: summary(v) for k, v in times.items()},
        "memory": {
            **memory,
            "tiling_peak_bytes": peak_model,
            "measured_over_tiling_bound": memory["peak_extra_bytes"] / peak_model,
            "within_budget": memory["peak_extra_bytes"] <= budget,
        },
        "extrapolated": extrapolated,
        "correctness": correctness,
        "protocol": {
            "reps": reps,
            "warmup": "one untimed run of each (the projection's is the correctness check)",
            "order": "interleaved, rotated each round",
            "rounds": len(timings.rounds),
            "clean_rounds": timings.n_clean(),
            "statistics": f"medians over clean rounds (every case within {timings.tol}x its fastest run); "
            "more rounds are run while fewer than reps are clean",
        },
        "conditions": {"loadavg_start": load_start, "loadavg_end": load_average()},
        "raw": {**timings.raw(), "memory_peak_extra_bytes": memory["peak_extra_bytes"]},
    }
    result["meets_target"] = meets_target(result)
    path = write_result(result, args.out)

    gib = 1 << 30
    print(
        f"{NAME}{' (quick)' if args.quick else ''}: {n_layers}x{d_mlp} neurons, vocab {vocab}, d {d_model}, "
        f"{timings.n_clean()} clean of {len(timings.rounds)} interleaved rounds"
    )
    print(f"  project   median {med['project']:.3f} s = {proj_fps / 1e9:.1f} GFLOP/s")
    print(f"  matmul    median {med['reference']:.3f} s = {ref_fps / 1e9:.1f} GFLOP/s")
    print(
        f"  fraction of matmul = {ratio:.3f}  (target >= {TARGET}; {'met' if result['meets_target'] else 'NOT met'}); "
        f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}], paired median {paired:.3f}"
    )
    print(
        f"  peak extra memory {memory['peak_extra_bytes'] / gib:.3f} GiB measured; tiling bound "
        f"{peak_model / gib:.3f} GiB; budget {budget / gib:.3f} GiB"
    )
    for name, e in extrapolated.items():
        print(
            f"  {name}: {e['gflop'] / 1e3:.1f} TFLOP -> {e['seconds_at_projection_flops'] / 60:.1f} min at the "
            f"projection's rate ({e['seconds_at_matmul_flops'] / 60:.1f} min at matmul rate)"
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
