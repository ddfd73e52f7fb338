"""Time per pi0 `infer` (prefix once + N flow-matching steps), steering off vs on.

Models, random weights, under torch.no_grad, one observation (instruction, images, state), fixed noise:

  tiny   the test suite's architecture (PaliGemma width 64, 2 layers; expert width 32; SigLIP 32 px,
         chunk 6, 3 steps), float32 on the CPU: the cost of the Python-level sampler itself.
  full   the real architecture (Gemma-2B + Gemma-300M, SigLIP So400m/14 at 224, 2 cameras, chunk 50,
         10 steps), bfloat16, only when a CUDA device is present (reference: ~75-86 ms per chunk on an
         RTX 4090 for LeRobot/openpi's PyTorch pi0). Skipped, and reported as skipped, without a GPU.

Steering on: a clamp concept of 20 neurons in each of 8 layers of the language stack and 20 in each
of 8 expert layers (two Steerers), all enabled. Modes are timed interleaved (off, on, on, off, ...).

Headline: median(on) / median(off) of the largest model measured, target <= 1.05.

`run(variant=...)` times the same for pi0.5 (benchmarks/pi05_step.py): one architecture, another policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import arg_parser, interleaved, load_average, machine, median, summary, write_result  # noqa: E402

from policies.pi0.config import Feature, GemmaDims, PI0Architecture, PI0Config, VisionDims  # noqa: E402
from policies.pi0.policy import PI0Policy  # noqa: E402
from policies.pi05.policy import PI05Policy  # noqa: E402
from vla_steer.core import tiny  # noqa: E402
from vla_steer.core.steering import Steerer  # noqa: E402
from vla_steer.wire import Observation  # noqa: E402

NAME = "pi0_step"
TARGET = 1.05
POLICIES = {"pi0": PI0Policy, "pi05": PI05Policy}
IDENTITY = {"VISUAL": "IDENTITY", "STATE": "IDENTITY", "ACTION": "IDENTITY"}


def tiny_policy(tok, variant: str = "pi0") -> PI0Policy:
    arch = PI0Architecture(
        paligemma=GemmaDims(64, 2, 128, 4, 1, 16),
        expert=GemmaDims(32, 2, 64, 4, 1, 16),
        vision=VisionDims(32, 64, 1, 2, 8, 32),
        vocab_size=len(tok),
        max_state_dim=12,
        max_action_dim=10,
    )
    cfg = PI0Config(
        arch,
        images=[Feature("observation.images.image", "VISUAL", (3, 32, 32))],
        state=Feature("observation.state", "STATE", (8,)),
        action=Feature("action", "ACTION", (7,)),
        chunk_size=6,
        n_action_steps=6,
        num_inference_steps=3,
        normalization=IDENTITY,
        variant=variant,
    )
    return POLICIES[variant].build(cfg, tok, seed=0)


def full_policy(tok, device: str, variant: str = "pi0") -> PI0Policy:
    cfg = PI0Config(
        PI0Architecture(),
        images=[
            Feature(f"observation.images.{k}", "VISUAL", (3, 224, 224)) for k in ("image", "wrist_image")
        ],
        state=Feature("observation.state", "STATE", (8,)),
        action=Feature("action", "ACTION", (7,)),
        normalization=IDENTITY,
        variant=variant,
    )
    with torch.device(device):
        policy = POLICIES[variant].build(cfg, tok, seed=0)
    policy.model.to(dtype=torch.bfloat16)
    return policy


def steerers(policy: PI0Policy, per_layer: int = 20, n_layers: int = 8) -> list[Steerer]:
    out = []
    g = torch.Generator().manual_seed(1)
    for key, bb in policy.backbones.items():
        layers = range(min(n_layers, bb.n_layers))
        neurons = [
            (layer, int(i)) for layer in layers for i in torch.randperm(bb.d_mlp, generator=g)[:per_layer]
        ]
        s = Steerer(bb)
        s.add(key, neurons, mode="clamp", strength=4.0, enabled=False)
        out.append(s)
    return out


def measure(policy: PI0Policy, size: int, reps: int, device: str) -> dict:
    rng = np.random.default_rng(0)
    obs = Observation(
        "pick up the black bowl and place it on the plate",
        {k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in policy.spec.image_keys},
        rng.normal(size=8).astype(np.float32),
    )
    noise = policy.sample_noise()
    st = steerers(policy)

    def off():
        for s in st:
            s.off()
        policy.infer(obs, noise=noise)

    def on():
        for s in st:
            s.enable(s.concepts[0])
        policy.infer(obs, noise=noise)

    on()
    steered = policy.infer(obs, noise=noise).actions
    off()
    if np.array_equal(steered, policy.infer(obs, noise=noise).actions):
        raise AssertionError("steering did not change the actions: the benchmark would time a no-op")
    t = interleaved({"off": off, "on": on}, reps=reps, warmup=2, device=device if device != "cpu" else None)
    clean = t.clean()
    return {
        "off_ms": summary([x * 1e3 for x in clean["off"]]),
        "on_ms": summary([x * 1e3 for x in clean["on"]]),
        "ratio": median(clean["on"]) / median(clean["off"]),
        "raw": t.raw(),
    }


def run(doc: str, name: str = NAME, target: float = TARGET, variant: str = "pi0") -> None:
    args = arg_parser(doc.splitlines()[0]).parse_args()
    # pi0.5 writes the state into its prompt as numbers: the tokenizer learns them
    corpus = (
        [" ".join(str(i) for i in range(-1, 256)), "Task: State: ;\nAction: "] if variant == "pi05" else None
    )
    tok = tiny.build_tokenizer(vocab_size=512, corpus=corpus)
    results = {"tiny_cpu_fp32": measure(tiny_policy(tok, variant), 32, 5 if args.quick else 30, "cpu")}
    device = "cuda" if torch.cuda.is_available() else None
    if device and not args.quick:
        results["full_cuda_bf16"] = measure(full_policy(tok, device, variant), 224, 20, device)
    else:
        why = "no CUDA device (no GPU on this machine or lent to this run)" if not device else "--quick"
        results["full_cuda_bf16"] = {"skipped": why}
    head = results["full_cuda_bf16"] if "ratio" in results["full_cuda_bf16"] else results["tiny_cpu_fp32"]
    for model, r in results.items():
        if "ratio" in r:
            print(f"{model}: off {r['off_ms']['median']:.1f} ms, on {r['on_ms']['median']:.1f} ms, "
                  f"ratio {r['ratio']:.3f}")  # fmt: skip
        else:
            print(f"{model}: skipped ({r['skipped']})")
    write_result(
        {
            "name": name,
            "value": head["ratio"],
            "unit": "steered/unsteered time per infer",
            "headline_model": "full_cuda_bf16" if head is results["full_cuda_bf16"] else "tiny_cpu_fp32",
            "target": target,
            "better": "lower",
            "machine": machine(device or "cpu"),
            "load_average": load_average(),
            "quick": args.quick,
            "per_infer_ms": {k: v.get("off_ms", {}).get("median") for k, v in results.items()},
            "raw": results,
        },
        args.out,
    )


if __name__ == "__main__":
    run(__doc__)
