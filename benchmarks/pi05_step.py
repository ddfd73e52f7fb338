"""Time per pi0.5 `infer` (prefix with the state in the prompt once + N flow-matching steps through the
time-conditioned expert), steering off vs on.

The models, inputs, steering and timing are benchmarks/pi0_step.py's (see there), with pi0.5's model: the
tiny architecture on the CPU in float32 always; the full one (Gemma-2B + Gemma-300M, 2 cameras at 224,
chunk 50, 10 steps, bfloat16) only where a CUDA device is present, else reported as skipped.

Headline: median(on) / median(off) of the largest model measured; target <= 1.02 (issue 17: the steering
overhead of the full model on a GPU at most 2%; the tiny CPU model's ratio is Python hook cost over a
model that does almost no arithmetic, an upper bound).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pi0_step import run  # noqa: E402

if __name__ == "__main__":
    run(__doc__, name="pi05_step", target=1.02, variant="pi05")
