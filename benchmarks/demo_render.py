"""demo_render: what leaving out the geometry the wrist camera cannot see saves per demo env step.

The demo's robosuite Lift (`vla_steer.app.demo.data.DEMO_SIM`: Panda, one 64x64 wrist camera, 10 Hz) skips
the arm, its mount and robosuite's collision meshes when it renders (`unseen_bodies`,
`draw_collision_geoms`; a test checks that the frames are the same pixels). In one process, interleaved
blocks of `env.step` in that env and in the same env drawing everything. Headline: median step with the
geometry skipped / median step with everything drawn; target <= 0.80 (the demo's evaluation is
sim-bound on 2 cores).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    arg_parser,
    load_average,
    machine,
    median,
    meets_target,
    summary,
    write_result,
)


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from vla_steer.app.demo import data

    steps, blocks = (15, 2) if args.quick else (40, 5)
    skipped = data.make_env()
    data.DEMO_SIM = data.DEMO_SIM | {"unseen_bodies": [], "draw_collision_geoms": True}
    everything = data.make_env()
    times: dict[str, list[float]] = {"skipped": [], "everything": []}
    try:
        rng = np.random.default_rng(0)
        for block in range(blocks):
            for name, env in (("skipped", skipped), ("everything", everything)):
                env.reset(block)
                env.step(np.zeros(7))  # the first step after a reset renders twice
                for _ in range(steps):
                    action = np.concatenate([rng.uniform(-0.3, 0.3, 3), np.zeros(3), [1.0]])
                    t = time.perf_counter()
                    env.step(action)
                    times[name].append(time.perf_counter() - t)
    finally:
        skipped.close()
        everything.close()

    value = median(times["skipped"]) / median(times["everything"])
    result = {
        "name": "demo_render",
        "value": value,
        "unit": "step time with the unseen geometry skipped / with everything drawn",
        "target": 0.80,
        "better": "lower",
        "quick": args.quick,
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": machine(),
        "load_average": load_average(),
        "median_ms": {k: median(v) * 1e3 for k, v in times.items()},
        "raw": {f"{k}_s": summary(v) for k, v in times.items()},
    }
    result["meets_target"] = meets_target(result)
    path = write_result(result, args.out)
    m = result["median_ms"]
    print(f"demo_render: env step {m['skipped']:.1f} ms skipping the unseen geometry, {m['everything']:.1f} ms "
          f"drawing everything: ratio {value:.2f} (target <= 0.80; {'met' if result['meets_target'] else 'NOT met'})")  # fmt: skip
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
