"""Time per pi0-FAST `infer` (prefix once + one cached forward per FAST token), steering off vs on.

Models, random weights, under torch.no_grad, one observation (instruction, images, state):

  tiny   the test suite's architecture (`policies.pi0_fast.tiny.tiny_policy`: PaliGemma width 64, 2 layers,
         SigLIP 32 px, two cameras, 24 decoded tokens), float32 on the CPU: the cost of the Python-level
         decoding loop and the hooks themselves.
  full   the real architecture (PaliGemma-3B: Gemma-2B + SigLIP So400m/14 at 224, two cameras), bfloat16,
         64 decoded tokens, only when a CUDA device is present. Skipped, and reported as skipped, without
         one (no GPU was lent to the session that wrote this: the figure is still to be measured).

A random model never writes the end-of-action marker, so both modes decode the same number of tokens:
the ratio compares equal work. Steering on: a clamp concept of 20 neurons in each of 8 layers (all of the
tiny model's 2), enabled. Modes are timed interleaved (off, on, on, off, ...).

Headline: median(on) / median(off) of the largest model measured; target <= 1.02 on the GPU (issue 17).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import arg_parser, interleaved, load_average, machine, median, summary, write_result  # noqa: E402

from policies.pi0.config import Feature  # noqa: E402
from policies.pi0_fast.config import FastArchitecture, FastConfig  # noqa: E402
from policies.pi0_fast.fast import FastTokenizer, smooth_chunks  # noqa: E402
from policies.pi0_fast.policy import PI0FastPolicy  # noqa: E402
from policies.pi0_fast.tiny import paligemma_tokenizer, tiny_policy  # noqa: E402
from vla_steer.core.steering import Steerer  # noqa: E402
from vla_steer.wire import Observation  # noqa: E402

NAME = "pi0fast_step"
TARGET = 1.02


def full_policy(device: str) -> PI0FastPolicy:
    arch = FastArchitecture()
    cfg = FastConfig(
        arch,
        images=[
            Feature(f"observation.images.{k}", "VISUAL", (3, 224, 224)) for k in ("image", "wrist_image")
        ],
        state=Feature("observation.state", "STATE", (8,)),
        action=Feature("action", "ACTION", (7,)),
        chunk_size=10,
        n_action_steps=10,
        max_decoding_steps=64,
        validate_action_token_prefix=False,
        normalization={"VISUAL": "IDENTITY", "STATE": "IDENTITY", "ACTION": "IDENTITY"},
    )
    # A tiny tokenizer padded to PaliGemma's 257152 pieces: the vocabulary projection and lm_head are full size.
    tok = paligemma_tokenizer(arch.vocab_size)
    fast = FastTokenizer.fit(smooth_chunks(300, 10, 7), vocab_size=1024)
    with torch.device(device):
        policy = PI0FastPolicy.build(cfg, tok, fast, seed=0, stats={})
    policy.model.to(dtype=torch.bfloat16)
    return policy


def steerer(policy: PI0FastPolicy, per_layer: int = 20, n_layers: int = 8) -> Steerer:
    bb = policy.backbone
    g = torch.Generator().manual_seed(1)
    neurons = [(layer, int(i)) for layer in range(min(n_layers, bb.n_layers))
               for i in torch.randperm(bb.d_mlp, generator=g)[:per_layer]]  # fmt: skip
    s = Steerer(bb)
    s.add("probe", neurons, mode="clamp", strength=20.0, enabled=False)
    return s


def measure(policy: PI0FastPolicy, size: int, reps: int, device: str) -> dict:
    rng = np.random.default_rng(0)
    obs = Observation(
        "pick up the black bowl and place it on the plate",
        {k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in policy.spec.image_keys},
        rng.normal(size=8).astype(np.float32),
    )
    st = steerer(policy)

    def off():
        st.off()
        return policy.infer(obs)

    def on():
        st.enable("probe")
        return policy.infer(obs)

    steered, plain = on().info["action_tokens"], off().info["action_tokens"]
    if steered == plain:
        raise AssertionError("steering did not change the decoded tokens: the benchmark would time a no-op")
    if len(steered) != len(plain):
        raise AssertionError(f"steered and plain decode {len(steered)} and {len(plain)} tokens: unequal work")
    t = interleaved({"off": off, "on": on}, reps=reps, warmup=2, device=device if device != "cpu" else None)
    clean = t.clean()
    return {
        "off_ms": summary([x * 1e3 for x in clean["off"]]),
        "on_ms": summary([x * 1e3 for x in clean["on"]]),
        "ratio": median(clean["on"]) / median(clean["off"]),
        "decoded_tokens": len(plain),
        "raw": t.raw(),
    }


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    results = {"tiny_cpu_fp32": measure(tiny_policy(), 32, 5 if args.quick else 30, "cpu")}
    device = "cuda" if torch.cuda.is_available() else None
    if device and not args.quick:
        results["full_cuda_bf16"] = measure(full_policy(device), 224, 20, device)
    else:
        why = "no CUDA device (no GPU lent to this session)" if not device else "--quick"
        results["full_cuda_bf16"] = {"skipped": why}
    head = results["full_cuda_bf16"] if "ratio" in results["full_cuda_bf16"] else results["tiny_cpu_fp32"]
    for name, r in results.items():
        if "ratio" in r:
            print(f"{name}: off {r['off_ms']['median']:.1f} ms, on {r['on_ms']['median']:.1f} ms, "
                  f"ratio {r['ratio']:.3f} ({r['decoded_tokens']} tokens)")  # fmt: skip
        else:
            print(f"{name}: skipped ({r['skipped']})")
    write_result(
        {
            "name": NAME,
            "value": head["ratio"],
            "unit": "steered/unsteered time per infer",
            "target": TARGET,
            "better": "lower",
            "machine": machine(device or "cpu"),
            "load_average": load_average(),
            "quick": args.quick,
            "gpu": "measured" if "ratio" in results["full_cuda_bf16"] else "not measured: no GPU lent",
            "per_infer_ms": {k: v.get("off_ms", {}).get("median") for k, v in results.items()},
            "raw": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
