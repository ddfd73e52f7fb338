"""eval_throughput: episodes per hour of the demo grid through `vla-steer eval`, 1 worker vs 2, on this machine.

The demo grid: the demo VLA (`vla-steer serve --policy demo_vla`, its directions found by `vla-steer
discover`) on the demo's robosuite Lift, baseline and fast/slow/up/down at strength 8, matched seeds; each
run is one `vla-steer eval` command into a fresh store, timed end to end (worker start-up included), with
one policy node shared by the workers (per-request steering). From the episodes' recorded summaries: the
share of the workers' episode time spent waiting on the policy node (reset + infer requests) and in the
simulator (reset + steps). Headline: episodes/hour with 2 workers / with 1 (higher is better; a second
worker helps only while the machine has a core for it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import VLA_STEER, arg_parser, load_average, machine, meets_target, policy_node, write_result  # noqa: E402

SETTINGS = ["off", "fast=8", "slow=8", "up=8", "down=8"]


def demo_sim_config(path: Path) -> Path:
    from vla_steer.app.demo.data import DEMO_SIM
    from vla_steer.app.demo.language import BASELINE_INSTRUCTION

    path.write_text(yaml.safe_dump({"kind": "robosuite", **DEMO_SIM, "instruction": BASELINE_INSTRUCTION}))
    return path


def run_grid(address: str, env: Path, out: Path, workers: int, episodes: int, max_steps: int) -> dict:
    from vla_steer.core.rollouts import open_store

    cmd = [VLA_STEER, "eval", "--server", address, "--env", str(env), "--settings", *SETTINGS,
           "--episodes", str(episodes), "--max-steps", str(max_steps), "--workers", str(workers), "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MUJOCO_GL": "egl"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"vla-steer eval failed ({r.returncode}): {r.stderr[-3000:]}")
    summaries = [i.meta["summary"] for i in open_store(out).episodes() if i.complete]
    episode_s = sum(s["wall_s"] for s in summaries)
    return {
        "workers": workers,
        "episodes": len(summaries),
        "steps": sum(s["length"] for s in summaries),
        "wall_s": wall,
        "episodes_per_hour": len(summaries) / wall * 3600,
        "episode_s": episode_s,  # summed over workers
        "policy_share": sum(s["policy_s"] for s in summaries) / episode_s,
        "sim_share": sum(s["sim_s"] for s in summaries) / episode_s,
    }


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    episodes, max_steps = (1, 10) if args.quick else (4, 100)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([VLA_STEER, "discover", "demo_vla", "--out", str(tmp / "directions")], check=True,
                       capture_output=True, env=env)  # fmt: skip
        sim = demo_sim_config(tmp / "demo_lift.yaml")
        with policy_node(["--policy", "demo_vla", "--directions", str(tmp / "directions")]) as (_, address):
            runs = [run_grid(address, sim, tmp / f"store{w}", w, episodes, max_steps) for w in (1, 2)]
    one, two = runs
    result = {
        "name": "eval_throughput",
        "value": two["episodes_per_hour"] / one["episodes_per_hour"],
        "unit": "x (episodes/hour, 2 workers / 1)",
        "target": 1.5,
        "better": "higher",
        "machine": machine(),
        "load_average": load_average(),
        "raw": {"grid": {"settings": SETTINGS, "episodes": episodes, "max_steps": max_steps}, "runs": runs},
    }
    result["meets_target"] = meets_target(result)
    path = write_result(result, args.out)
    for r in runs:
        print(f"{r['workers']} worker(s): {r['episodes_per_hour']:.0f} episodes/hour ({r['episodes']} episodes in "
              f"{r['wall_s']:.0f} s); waiting on the policy {r['policy_share']:.0%}, in the simulator "
              f"{r['sim_share']:.0%} of episode time")  # fmt: skip
    print(f"speed-up with 2 workers: {result['value']:.2f}x -> {path}")


if __name__ == "__main__":
    main()
