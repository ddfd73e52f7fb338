"""Demonstrations for the demo VLA: the scripted Lift expert in robosuite, at every speed and height.

Each episode draws a speed ("slow", "normal", "fast") and a carrying height ("low", "normal", "high"),
runs the expert (`vla_steer.app.demo.expert`) in the same robosuite node configuration the demo evaluates in
(`DEMO_SIM`), and stores what the policy will see (the wrist image and the 8-d state) with the expert's
action. Instructions are not stored: training phrases each episode's labels anew every time it is drawn
(`vla_steer.app.demo.language`), so the model meets many wordings of one behaviour.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vla_steer.app.demo.expert import HEIGHTS, SPEEDS, LiftExpert
from vla_steer.wire import ServerInfo

IMAGE_KEY = "wrist"
IMAGE_SIZE = 64
CONTROL_HZ = 10.0
MAX_STEPS = 110  # the slowest, highest lift takes about 80 steps
HOLD_STEPS = 4  # steps recorded after the expert reaches its carrying height
DEMO_SIM = dict(
    task="Lift",
    robot="Panda",
    cameras={IMAGE_KEY: "robot0_eye_in_hand"},
    image_size=(IMAGE_SIZE, IMAGE_SIZE),
    control_freq=CONTROL_HZ,
    reflections=False,
)
STATE_DIM = 8


def make_env():
    os.environ.setdefault("MUJOCO_GL", "egl")
    from sim.robosuite_env import RobosuiteConfig, RobosuiteEnv

    # What the policy node's hello reply will announce, so the env sends the state as it will at test time.
    info = ServerInfo(
        "demo-expert",
        7,
        1,
        CONTROL_HZ,
        {IMAGE_KEY: (IMAGE_SIZE, IMAGE_SIZE, 3)},
        info={"state_dim": STATE_DIM},
    )
    return RobosuiteEnv(RobosuiteConfig(**DEMO_SIM), info)


def _episodes(jobs: list[tuple[int, str, str]]) -> dict[str, np.ndarray]:
    """Run the expert for each (seed, speed, height); concatenated step arrays."""
    env = make_env()
    out: dict[str, list] = {k: [] for k in ("images", "states", "actions", "episode", "speed", "height")}
    try:
        for seed, speed, height in jobs:
            obs = env.reset(seed)
            expert = LiftExpert(SPEEDS[speed], HEIGHTS[height])
            held = 0
            for _ in range(MAX_STEPS):
                action = expert.act(obs.ee_pos, np.asarray(env.ground_truth["cube_pos"]))
                out["images"].append(obs.images[IMAGE_KEY])
                out["states"].append(obs.state)
                out["actions"].append(action.astype(np.float32))
                out["episode"].append(seed)
                out["speed"].append(list(SPEEDS).index(speed))
                out["height"].append(list(HEIGHTS).index(height))
                obs = env.step(action).observation
                if expert.phase == "lift" and abs(obs.ee_pos[2] - expert.table_z - expert.height) < 0.01:
                    held += 1
                    if held > HOLD_STEPS:
                        break
    finally:
        env.close()
    return {k: np.stack(v) for k, v in out.items()}


def generate(path: str | Path, episodes_per_setting: int = 16, seed: int = 0, workers: int = 2) -> Path:
    """Write `path` (.npz): images [N, 64, 64, 3] uint8, states [N, 8], actions [N, 7], and per step its
    episode seed and speed/height label indices (into SPEEDS / HEIGHTS)."""
    settings = list(itertools.product(SPEEDS, HEIGHTS))
    jobs = [
        (seed + i * len(settings) + j, speed, height)
        for i in range(episodes_per_setting)
        for j, (speed, height) in enumerate(settings)
    ]
    shards = [jobs[w::workers] for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_episodes, shards))
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path
