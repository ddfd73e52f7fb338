"""Time per `OpenVLAPolicy.infer` (preprocess, prefill, 7 cached decode steps, de-tokenise), steering off/on.

Model:
  cpu (default)  the tiny OpenVLA of the tests (fused ViTs 32/48 wide, 3 blocks, 224x224 input; Llama with
                 4 layers, d 64, d_mlp 128, vocab 32064), float32, saved in the official checkpoint layout
                 and loaded through `OpenVLAPolicy.load`.
  cuda           (`--device cuda`, only where a GPU is present) the full openvla-7b architecture
                 (tests/data/openvla_7b_config.json) with random weights in bfloat16; the tiny tokenizer
                 (same id layout). Published: ~6 Hz on an RTX 4090 with the official code.

Two cases timed interleaved in one process (after warm-up rounds): `off`, the Steerer's hooks removed
(the unhooked model); `on`, one clamp concept enabled with 20 neurons in each of 8 layers (the paper's
clusters: 10-20 neurons in the upper half of the stack), steering every position of the prefill and every
decoded token. Before timing, the benchmark checks that steering changed the logits.

Headline: median(on) / median(off), target <= 1.05 (steering a whole inference costs under 5%);
ms per infer and Hz for both cases are in `raw`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    Case,
    arg_parser,
    bootstrap_ratio_ci,
    interleaved,
    load_average,
    machine,
    median,
    summary,
    write_result,
)

from policies.openvla import OpenVLAPolicy, PrismaticConfig, PrismaticModel, processing, tiny  # noqa: E402
from vla_steer.core.steering import Steerer  # noqa: E402
from vla_steer.wire import Observation  # noqa: E402

NAME = "openvla_step"
TARGET = 1.05
NEURONS_PER_LAYER = 20
STEERED_LAYERS_FULL = list(range(16, 32, 2))  # 8 of layers 15..31
STRENGTH = 8.0
SEED = 0
CONFIG_7B = Path(__file__).resolve().parents[1] / "tests" / "data" / "openvla_7b_config.json"


def tiny_policy(directory: Path) -> OpenVLAPolicy:
    tiny.save_checkpoint(directory, tiny.build_model(seed=SEED))
    return OpenVLAPolicy.load(directory, unnorm_key="tiny_suite")


def full_policy(device: str) -> OpenVLAPolicy:
    """openvla-7b's architecture, random bf16 weights, on `device` (a GPU: 15 GB)."""
    cfg = PrismaticConfig.from_file(CONFIG_7B)
    with torch.device("meta"):
        model = PrismaticModel(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_factor") or (p.ndim == 1 and "norm" in name.split(".")[-2]):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model._rebuild_buffers(torch.device(device))
    tokenizer = tiny.build_tokenizer()
    stats = processing.select_stats(tiny.TINY_STATS, "tiny_suite")
    image_processor = processing.ImageProcessor.for_checkpoint(Path("/nonexistent"), cfg, center_crop=False)
    return OpenVLAPolicy(model.eval(), tokenizer, image_processor, stats, name="openvla-7b-random")


def choose_neurons(n_layers: int, d_mlp: int, layers: list[int]) -> list[tuple[int, int, float]]:
    g = torch.Generator().manual_seed(SEED + 1)
    neurons = []
    for layer in layers:
        idx = torch.randperm(d_mlp, generator=g)[:NEURONS_PER_LAYER].tolist()
        neurons += [(layer, i, 1.0) for i in idx]
    return neurons


def main() -> int:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (tiny model) or cuda (full-size, random weights)")
    args = p.parse_args()
    full = args.device.startswith("cuda")
    if full and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU; this machine has none")
    if not full:
        torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other on a shared machine
    reps, warmup, max_rounds, time_limit = (6, 2, 12, 30.0) if args.quick else (40, 3, 80, 240.0)
    load_start = load_average()

    with tempfile.TemporaryDirectory() as tmp:
        policy = full_policy(args.device) if full else tiny_policy(Path(tmp))
    bb = policy.backbone
    layers = STEERED_LAYERS_FULL if full else list(range(bb.n_layers))
    neurons = choose_neurons(bb.n_layers, bb.d_mlp, layers)
    image = np.random.default_rng(SEED).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    obs = Observation(
        "put both the alphabet soup and the tomato sauce in the basket", {policy.image_key: image}
    )
    n_params = sum(t.numel() for t in policy.model.parameters())
    print(f"{NAME}: {policy.spec.name}, {n_params / 1e6:.1f}M parameters on {args.device}; clamp "
          f"{NEURONS_PER_LAYER} neurons x {len(layers)} layers at {STRENGTH}", file=sys.stderr)  # fmt: skip

    steerer = Steerer(bb)
    steerer.add("bench", neurons, strength=STRENGTH)
    steerer.remove()

    def infer():
        return policy.infer(obs)

    # -- sanity: steering is not a no-op ------------------------------------------------------------------
    ids = policy.input_ids(obs.instruction)
    px = policy.pixel_values(image)
    with torch.no_grad():
        embeds = policy.model.embed(ids, px)
        base = policy.model.language_model(inputs_embeds=embeds).logits.float()
        steerer.attach()
        steered = policy.model.language_model(inputs_embeds=embeds).logits.float()
        steerer.remove()
    change = (steered - base).abs().max().item()
    if not change > 1e-3:
        raise AssertionError(f"steering did not change the logits (max |diff| {change:.3g})")

    timings = interleaved(
        {"off": Case(infer), "on": Case(infer, steerer.attach, steerer.remove)},
        reps,
        warmup,
        max_rounds=max_rounds,
        time_limit_s=time_limit,
        device=args.device,
    )
    clean = timings.clean()
    ratio = median(clean["on"]) / median(clean["off"])
    lo, hi = bootstrap_ratio_ci(clean["on"], clean["off"])
    off_ms, on_ms = median(clean["off"]) * 1e3, median(clean["on"]) * 1e3
    result = {
        "name": NAME,
        "value": round(ratio, 4),
        "unit": "ratio (median infer time, steering on / off)",
        "target": TARGET,
        "better": "lower",
        "machine": machine(args.device),
        "raw": {
            "model": "openvla-7b architecture, random bf16 weights"
            if full
            else "tiny OpenVLA (tests), float32",
            "parameters": n_params,
            "ms_per_infer_off": round(off_ms, 3),
            "ms_per_infer_on": round(on_ms, 3),
            "hz_off": round(1e3 / off_ms, 2),
            "hz_on": round(1e3 / on_ms, 2),
            "published_hz_rtx4090_official": 6.0 if full else None,
            "ratio_ci95": [round(lo, 4), round(hi, 4)],
            "steered": {"layers": layers, "neurons_per_layer": NEURONS_PER_LAYER, "strength": STRENGTH},
            "steering_changes_logits_max_abs": change,
            "off": summary(clean["off"]),
            "on": summary(clean["on"]),
            "rounds": timings.raw(),
            "n_clean": timings.n_clean(),
            "quick": args.quick,
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
    }
    path = write_result(result, args.out)
    print(f"{NAME}: on/off {ratio:.3f} (95% CI {lo:.3f}-{hi:.3f}); off {off_ms:.1f} ms ({1e3 / off_ms:.1f} Hz), "
          f"on {on_ms:.1f} ms -> {path}", file=sys.stderr)  # fmt: skip
    return 0  # a missed target shows in the result (value vs target), never as a failed run: timings are not tests


if __name__ == "__main__":
    sys.exit(main())
