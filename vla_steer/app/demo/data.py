"""Demonstrations for the demo VLA: the scripted Lift expert in robosuite, at every speed and height.

Each episode draws a speed ("slow", "normal", "fast") and a carrying height ("low", "normal", "high"),
runs the expert (`vla_steer.app.demo.expert`) in the same robosuite node configuration the demo evaluates in
(`DEMO_SIM`), and stores what the policy will see (the wrist image and the 8-d state) with the expert's
action. Most episodes execute the expert's action plus Gaussian noise while recording the clean action
(DART, Laskey et al. 2017): the policy then sees states off the expert's path labelled with the way back,
which is what keeps a cloned policy from drifting off its demonstrations in closed loop. An episode whose
expert did not lift the cube is dropped. Instructions are not stored: training phrases each episode's labels anew every time it is drawn
(`vla_steer.app.demo.language`), so the model meets many wordings of one behaviour.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

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
    # The wrist camera never sees the arm behind it nor its mount: the same frames in a third of the render time.
    unseen_bodies=["robot0_", "fixed_mount0_"],
    draw_collision_geoms=False,
)
STATE_DIM = 8
# The arms the demo VLA learns. The UR5e is the robot node's MuJoCo twin (`ur5e_mujoco_lift`, which names the
# same gripper); robosuite 1.5's default UR5e gripper, the Robotiq85, jams before it closes on the cube
# (robosuite#772), so the UR5e carries the Robotiq140.
ROBOTS = {"Panda": {}, "UR5e": {"gripper_types": "Robotiq140Gripper"}}


def make_env(robot: str = "Panda"):
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
    config = RobosuiteConfig(**DEMO_SIM | {"robot": robot, "env_kwargs": ROBOTS[robot]})
    return RobosuiteEnv(config, info)


# What `generate` writes for every step.
KEYS = ("images", "states", "actions", "cube", "episode", "speed", "height", "robot")

# DART: per episode, the executed actions' noise std (normalised xyz units) is drawn from this range.
NOISE = (0.0, 0.25)
CLEAN_SHARE = 0.25  # episodes executed without noise


def _episodes(jobs: list[tuple[int, str, str, str]]) -> dict[str, np.ndarray]:
    """Run the expert for each (seed, speed, height, robot); concatenated step arrays of the episodes it
    lifted."""
    envs: dict[str, Any] = {}
    out: dict[str, list] = {k: [] for k in KEYS}
    try:
        for seed, speed, height, robot in jobs:
            env = envs.get(robot) or envs.setdefault(robot, make_env(robot))
            rng = np.random.default_rng(seed)
            noise = 0.0 if rng.random() < CLEAN_SHARE else rng.uniform(*NOISE)
            obs = env.reset(seed)
            expert = LiftExpert(SPEEDS[speed], HEIGHTS[height])
            held = 0
            episode: dict[str, list] = {k: [] for k in KEYS}
            for _ in range(MAX_STEPS):
                cube = np.asarray(env.ground_truth["cube_pos"])
                action = expert.act(obs.ee_pos, cube)
                episode["images"].append(obs.images[IMAGE_KEY])
                episode["states"].append(obs.state)
                episode["actions"].append(action.astype(np.float32))
                episode["cube"].append((cube - obs.ee_pos).astype(np.float32))
                episode["episode"].append(seed)
                episode["speed"].append(list(SPEEDS).index(speed))
                episode["height"].append(list(HEIGHTS).index(height))
                episode["robot"].append(list(ROBOTS).index(robot))
                executed = action.copy()
                executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
                obs = env.step(executed).observation
                if expert.phase == "lift" and abs(obs.ee_pos[2] - expert.table_z - expert.height) < 0.01:
                    held += 1
                    if held > HOLD_STEPS:
                        break
            if env.success():
                for k in KEYS:
                    out[k] += episode[k]
    finally:
        for env in envs.values():
            env.close()
    return {k: np.stack(v) if v else np.zeros((0,)) for k, v in out.items()}  # (an empty shard is skipped)


TRAIN_SEEDS = 10_000  # demonstrations start at this seed; the demo evaluates seeds from 0, never trained on


def generate(
    path: str | Path,
    episodes_per_setting: int = 16,
    seed: int = TRAIN_SEEDS,
    workers: int = 2,
    robots: dict[str, int] | None = None,
) -> Path:
    """Write `path` (.npz): images [N, 64, 64, 3] uint8, states [N, 8], actions [N, 7], the cube's offset from
    the end effector [N, 3] (world frame, metres: what the wrist camera sees), and per step its episode seed
    and speed/height/robot label indices (into SPEEDS / HEIGHTS / ROBOTS). `robots`: episodes per setting of
    each arm (default: `episodes_per_setting` of the Panda)."""
    settings = list(itertools.product(SPEEDS, HEIGHTS))
    robots = robots or {"Panda": episodes_per_setting}
    jobs = [
        (seed + r * 100_000 + i * len(settings) + j, speed, height, robot)
        for r, (robot, count) in enumerate(robots.items())
        for i in range(count)
        for j, (speed, height) in enumerate(settings)
    ]
    shards = [jobs[w::workers] for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = [p for p in pool.map(_episodes, shards) if len(p["actions"])]
    if not parts:
        raise RuntimeError(f"the expert lifted the cube in none of its {len(jobs)} demonstrations")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path
