"""sim_overhead: what the stack adds to a simulated control step, beyond the env and the model.

One control step of the full loop = observation -> `Client.infer` over loopback ZeroMQ to a policy node in
its own process (`vla-steer serve`, the TinyVLA) -> `env.step` (robosuite Lift, MuJoCo, EGL rendering)
-> `EpisodeRecorder.step` into a rollout store. Per step we time the whole step, the env step inside
it, and take the policy's own time from the reply (`info.policy_ms`); the rest is the stack's overhead
(codec, sockets, threads, validation, recording). In the same run, blocks of bare `env.step` calls give
the reference. Headline: median overhead / median bare env step; target <= 0.10.
"""

from __future__ import annotations

import os
import sys
import tempfile
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
    tiny_vla_node,
    write_result,
)


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from sim.robosuite_env import RobosuiteEnv, load_sim_config
    from vla_steer.core.rollouts import EpisodeRecorder, Recorder
    from vla_steer.wire import Client
    from vla_steer.wire.messages import Step

    steps, blocks = (20, 2) if args.quick else (60, 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tiny_vla_node(tmp) as (_, address), Client(address, timeout=30) as client:
            info = client.hello()
            env = RobosuiteEnv(load_sim_config("robosuite_lift"), info)
            recorder = EpisodeRecorder(Recorder(tmp / "store"), {"benchmark": "sim_overhead"})
            obs = env.reset(0)
            zero = np.zeros(env.action_dim)
            total, env_in_loop, model, bare = [], [], [], []
            for _ in range(3):  # warm-up: first render, first inference
                env.step(zero)
                client.infer(obs.observation)
            for block in range(blocks):
                for _ in range(steps):  # bare env steps (the reference)
                    t = time.perf_counter()
                    env.step(zero)
                    bare.append(time.perf_counter() - t)
                obs = env.reset(block + 1)
                for _ in range(steps):  # the full loop, as sim.runner runs it
                    t0 = time.perf_counter()
                    reply = client.infer(obs.observation)
                    chunk = np.array(reply.actions, dtype=np.float64)
                    t1 = time.perf_counter()
                    result = env.step(chunk[0])
                    t2 = time.perf_counter()
                    recorder.step(Step(
                        obs.observation, action=chunk[0], action_chunk=chunk,
                        ee_pos=obs.ee_pos, ee_quat=obs.ee_quat, ee_vel=obs.ee_vel, reward=result.reward,
                        t_sim=result.observation.t_sim, steering=reply.info.get("steering", {}),
                    ), episode=f"bench-{block}")  # fmt: skip
                    t3 = time.perf_counter()
                    total.append(t3 - t0)
                    env_in_loop.append(t2 - t1)
                    model.append(reply.info["policy_ms"] / 1e3)
                    obs = result.observation
                recorder.end()
            env.close()

    overhead = [t - e - m for t, e, m in zip(total, env_in_loop, model, strict=True)]
    value = median(overhead) / median(bare)
    result = {
        "name": "sim_overhead",
        "value": value,
        "unit": "fraction of a bare env step",
        "target": 0.10,
        "better": "lower",
        "quick": args.quick,
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": machine(),
        "load_average": load_average(),
        "env": "robosuite Lift, Panda, 32x32 agentview (TinyVLA's resolution), EGL",
        "median_ms": {
            "full_step": median(total) * 1e3,
            "env_step_in_loop": median(env_in_loop) * 1e3,
            "env_step_bare": median(bare) * 1e3,
            "model": median(model) * 1e3,
            "overhead": median(overhead) * 1e3,
        },
        "raw": {
            "full_step_s": summary(total),
            "env_step_in_loop_s": summary(env_in_loop),
            "env_step_bare_s": summary(bare),
            "model_s": summary(model),
            "overhead_s": summary(overhead),
        },
    }
    result["meets_target"] = meets_target(result)
    path = write_result(result, args.out)
    m = result["median_ms"]
    print(
        f"sim_overhead: full step {m['full_step']:.1f} ms = env {m['env_step_in_loop']:.1f} + model {m['model']:.1f} "
        f"+ stack {m['overhead']:.2f} ms; bare env step {m['env_step_bare']:.1f} ms"
    )
    print(
        f"  stack overhead / env step = {value:.3f} (target <= 0.10; {'met' if result['meets_target'] else 'NOT met'})"
    )
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
