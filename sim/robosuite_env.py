"""robosuite (MuJoCo) as an environment for the policy node: Lift, Stack, PickPlace*, ... with Panda or UR5e.

Conventions (what a policy served to this env must mean by its inputs and outputs):

Action (7 floats, OpenVLA/LIBERO style): `dx dy dz droll dpitch dyaw gripper`.
    The first six go to robosuite's OSC_POSE controller in delta mode (`input_type: delta`, robot base
    frame): each is clipped to [-1, 1] after `action_scale` and mapped linearly to +-`max_delta_pos`
    metres / +-`max_delta_rot` radians (axis-angle) per control step (robosuite's defaults, 0.05 / 0.5;
    LIBERO records its actions in exactly these normalised units, so LIBERO-finetuned checkpoints apply
    as they are). The gripper value is mapped to robosuite's convention (-1 open, +1 closed) by
    `gripper`: "open_positive" (default: OpenVLA's RLDS convention rescaled to [-1, 1], +1 = open, so
    robosuite gets -g), "close_positive" (already robosuite's, +1 = close), or "open_unit" (raw
    OpenVLA output in [0, 1], 1 = open: robosuite gets 1 - 2g). `binarize_gripper` sends only the sign.
    A policy that announces its gripper in its hello reply (OpenVLA: open_unit) is refused under any other
    mapping, naming the setting to change (`sim.conventions.check_policy`, the LIBERO node's check too).

State (8 floats, `state: eef_pos_axisangle_gripper`, what openpi's LIBERO example feeds pi0):
    `robot0_eef_pos` (3, world frame, m) + `robot0_eef_quat` (x, y, z, w) as axis-angle (3, no sign
    canonicalisation, like openpi's `_quat2axisangle`) + the gripper's finger joint positions (2; a
    Robotiq85 has 6 gripper joints: its two driver joints, the first of each finger, are used).
    Sent only when the policy's hello reply announces `state_dim` (8; any other size is an error).

Images: one robosuite camera per policy image key (`cameras`), rendered at the policy's resolution (the
hello reply's image_keys), uint8, right side up. robosuite renders in the OpenGL convention (bottom row
first); the env flips according to `robosuite.macros.IMAGE_CONVENTION` as it was when the env was
built, so it never changes that process-wide macro. `rotate_images_180` reproduces what LIBERO-trained
checkpoints saw: the renderer's bottom-up frame rotated by 180 degrees, i.e. the upright image mirrored
left to right (set it for LIBERO-trained checkpoints).

Rendering is headless through EGL (Mesa's llvmpipe on a CPU machine): `MUJOCO_GL=egl` is the default
here. `MUJOCO_GL=osmesa` also works (`apt-get install libosmesa6`) but is ~8x slower.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sim.base import SimObservation, StepResult, camera_map, image_shapes, quat2axisangle, to_osc_action
from sim.conventions import check_policy
from vla_steer.core.config import load_yaml_model, resolve_config

# Default instruction per robosuite task (override with `instruction:` in the config).
INSTRUCTIONS: dict[str, str] = {
    "Lift": "pick up the red cube",
    "Stack": "stack the red cube on top of the green cube",
    "PickPlace": "put each object into its matching bin",
    "PickPlaceSingle": "put the object into its matching bin",
    "PickPlaceCan": "pick up the can and put it in the bin",
    "PickPlaceMilk": "pick up the milk carton and put it in the bin",
    "PickPlaceBread": "pick up the bread and put it in the bin",
    "PickPlaceCereal": "pick up the cereal box and put it in the bin",
    "NutAssemblySquare": "put the square nut on the square peg",
    "NutAssemblyRound": "put the round nut on the round peg",
    "Door": "open the door",
}
STATE_DIMS = {"eef_pos_axisangle_gripper": 8}


COLLISION_GROUP = 0  # robosuite's geom group of collision meshes (visual meshes: 1)
HIDDEN_GROUP = 5  # MuJoCo's render option draws geom groups 0-2 by default


class RobosuiteConfig(BaseModel):
    """A robosuite sim config (`vla_steer/configs/sims/robosuite_*.yaml`); see the module docstring for conventions."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["robosuite"] = "robosuite"
    task: str = "Lift"  # a robosuite environment name
    robot: str = "Panda"
    # policy image key -> robosuite camera
    cameras: dict[str, str] = Field(default_factory=lambda: {"agentview": "agentview"})
    image_size: tuple[int, int] | None = None  # (H, W); None: the policy's (hello reply), else 224x224
    rotate_images_180: bool = False
    instruction: str | None = None  # None: INSTRUCTIONS[task]
    state: Literal["eef_pos_axisangle_gripper"] = "eef_pos_axisangle_gripper"
    control_freq: float = 20.0
    max_delta_pos: float = Field(0.05, gt=0)  # metres per control step at action 1.0
    max_delta_rot: float = Field(0.5, gt=0)  # radians per control step at action 1.0
    action_scale: float = Field(1.0, gt=0)
    gripper: Literal["open_positive", "close_positive", "open_unit"] = "open_positive"
    binarize_gripper: bool = False
    reward_shaping: bool = False
    initialization_noise: bool = True  # robosuite's default joint noise at reset (seeded)
    # robosuite draws parts of the scene when it builds the model (Lift: the cube's size, 20-22 mm) from the
    # env's generator, unseeded by default: seeded, every process builds the same scene, so an episode seed
    # is the same episode in every run and every worker.
    scene_seed: int = 0
    # Mirror reflections (floor, table) make every frame render the scene twice: about half the render
    # time on a CPU renderer. Off for policies that were trained without them (the demo VLA).
    reflections: bool = True
    # Half-width (m) of the square the task's object is placed in, around its usual centre; None: the task's
    # own (Lift: 0.03). E.g. to see whether a policy finds the object where its demonstrations never put it.
    placement_range: float | None = Field(None, gt=0, le=0.2)
    # Geometry no camera sees, left out of every frame: the visual geoms of the bodies named here by prefix
    # (e.g. the arm behind a wrist camera), and robosuite's collision geoms, which it draws inside their visual
    # meshes. The same pixels in a third of the render time on a CPU renderer; only for cameras that truly
    # cannot see them (the demo's wrist camera; its test compares the frames).
    unseen_bodies: list[str] = Field(default_factory=list)
    draw_collision_geoms: bool = True
    env_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed on to robosuite.make

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one policy image key -> robosuite camera")
        return v

    def instruction_text(self) -> str:
        if self.instruction is not None:
            return self.instruction
        try:
            return INSTRUCTIONS[self.task]
        except KeyError:
            raise ValueError(
                f"no default instruction for task {self.task!r} (known: {sorted(INSTRUCTIONS)}); "
                "set `instruction:` in the sim config"
            ) from None

    def conventions(self) -> dict[str, Any]:
        """What a rollout from this config means by its actions, state and images (episode metadata)."""
        fields = {"max_delta_pos", "max_delta_rot", "action_scale", "gripper", "binarize_gripper", "state",
                  "rotate_images_180", "cameras", "control_freq"}  # fmt: skip
        return self.model_dump(mode="json", include=fields) | {
            "action": "osc_pose_delta_normalised",
            "state_names": ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "finger_l", "finger_r"],
        }


def load_sim_config(path: str | Path) -> RobosuiteConfig:
    """Parse and validate a sim config (a path, or a shipped config's name); errors name the file, the key
    and what is allowed."""
    return load_yaml_model(resolve_config(path, "sims"), RobosuiteConfig, "sim config")


class RobosuiteEnv:
    """A robosuite task driven by 7-d end-effector delta actions, observed as a policy expects.

    `info` is the policy node's hello reply (`ServerInfo`): its image keys and shapes set the cameras'
    resolution and its `info["state_dim"]` whether a state is sent. Without it, `config.cameras` and
    `config.image_size` (default 224x224) decide and no state is sent.
    """

    action_dim = 7

    def __init__(self, config: RobosuiteConfig, info: Any | None = None):
        os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless by default
        import robosuite
        import robosuite.macros as macros
        from robosuite.controllers import load_composite_controller_config

        self.config = config
        self.instruction = config.instruction_text()
        self.image_shapes = image_shapes(config.image_size, config.cameras, info)
        self.cameras = camera_map(config.cameras, self.image_shapes)
        state_dim = (info.info or {}).get("state_dim") if info is not None else None
        if state_dim is not None and state_dim != STATE_DIMS[config.state]:
            raise ValueError(
                f"the policy expects a state of {state_dim} floats; sim state {config.state!r} has "
                f"{STATE_DIMS[config.state]}"
            )
        self.send_state = state_dim is not None
        if info is not None and info.action_dim != self.action_dim:
            raise ValueError(f"the policy's actions have {info.action_dim} dims; this env takes 7 (see docs)")
        if info is not None:  # e.g. OpenVLA's [0, 1] gripper under the default open_positive: refused
            check_policy(info.conventions, gripper=config.gripper)

        controller = load_composite_controller_config(robot=config.robot)
        arm = controller["body_parts"].get("right") or controller["body_parts"].get("arms", {}).get("right")
        if arm is None:
            raise ValueError(f"robot {config.robot!r}: no single right arm in its default controller")
        pos, rot = config.max_delta_pos, config.max_delta_rot
        arm.update(
            type="OSC_POSE",
            input_type="delta",
            input_max=1,
            input_min=-1,
            output_max=[pos] * 3 + [rot] * 3,
            output_min=[-pos] * 3 + [-rot] * 3,
        )
        kwargs: dict[str, Any] = dict(
            robots=config.robot,
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=True,
            use_camera_obs=True,
            camera_names=list(self.cameras.values()),
            camera_heights=[self.image_shapes[k][0] for k in self.cameras],
            camera_widths=[self.image_shapes[k][1] for k in self.cameras],
            control_freq=config.control_freq,
            reward_shaping=config.reward_shaping,
            ignore_done=True,  # the runner decides when an episode ends
            hard_reset=False,  # rebuilding the model each reset costs seconds and recreates the sensors
            initialization_noise="default" if config.initialization_noise else None,
            seed=config.scene_seed,
        )
        kwargs.update(config.env_kwargs)
        # The camera sensors capture the convention when they are created, i.e. now.
        self._flip_rows = macros.IMAGE_CONVENTION == "opengl"
        self.env = robosuite.make(config.task, **kwargs)
        if self.env.action_dim != self.action_dim:
            self.env.close()
            raise ValueError(
                f"{config.task} with {config.robot} takes {self.env.action_dim}-d actions, not 7 "
                "(one arm with OSC_POSE plus one gripper value)"
            )
        if config.placement_range is not None:
            self._widen_placement(config.placement_range)
        if config.unseen_bodies:
            self._hide_bodies(config.unseen_bodies)
        self._robot = self.env.robots[0]
        self._eef_site = self._robot.gripper["right"].important_sites["grip_site"]
        self._obs: dict[str, Any] | None = None

    # -- the SimEnv interface -------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> SimObservation:
        """New episode. With a seed, object placement and joint noise are reproducible."""
        if seed is not None:
            # robosuite's placement samplers and robots hold this very Generator: reseed it in place.
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._obs = self.env.reset()
        self._render_options()
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        """Execute one policy action (7 floats, see the module docstring for the mapping)."""
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        env_action = to_osc_action(
            action, self.config.gripper, self.config.binarize_gripper, self.config.action_scale
        )
        self._obs, reward, _, info = self.env.step(env_action)
        return StepResult(self.observation(), float(reward), {"env_action": env_action, **info})

    def success(self) -> bool:
        return bool(self.env._check_success())

    def _widen_placement(self, r: float) -> None:
        sampler = getattr(self.env, "placement_initializer", None)
        if not (hasattr(sampler, "x_range") and hasattr(sampler, "y_range")):
            self.env.close()
            raise ValueError(
                f"placement_range: {self.config.task} has no uniform object placement to set (only tasks with "
                "one placement sampler, such as Lift, take it)"
            )
        sampler.x_range, sampler.y_range = [-r, r], [-r, r]  # kept across resets (no hard reset)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> RobosuiteEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_meta(self) -> dict[str, Any]:
        """What every episode of this env records about it (`sim.session`): task, robot, config, conventions."""
        cfg = self.config
        return {
            "sim": "robosuite",
            "task": cfg.task,
            "robot": cfg.robot,
            "sim_config": cfg.model_dump(mode="json"),
            "conventions": cfg.conventions(),
        }

    # -- conversions ----------------------------------------------------------------------------

    @property
    def ground_truth(self) -> dict[str, Any]:
        """robosuite's own observation dict (object poses included): for scripted experts, not policies."""
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return self._obs

    @property
    def gripper_qpos(self) -> np.ndarray:
        """The gripper's joint positions (Panda: the two fingers, larger = more open)."""
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return np.array(self._obs["robot0_gripper_qpos"], dtype=np.float64)

    def observation(self) -> SimObservation:
        obs = self._obs
        if obs is None:
            raise RuntimeError("call reset() first")
        images = {key: self._image(obs[f"{cam}_image"]) for key, cam in self.cameras.items()}
        ee_pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        ee_quat = np.asarray(obs["robot0_eef_quat"], dtype=np.float64)
        state = None
        if self.send_state:
            q = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
            fingers = q if q.size == 2 else q[[0, q.size // 2]]
            state = np.concatenate([ee_pos, quat2axisangle(ee_quat), fingers]).astype(np.float32)
        ee_vel = np.array(self.env.sim.data.get_site_xvelp(self._eef_site), dtype=np.float64)
        return SimObservation(
            instruction=self.instruction,
            images=images,
            state=state,
            ee_pos=ee_pos.copy(),
            ee_quat=ee_quat.copy(),
            ee_vel=ee_vel,
            t_sim=float(self.env.sim.data.time),
        )

    def _render_options(self) -> None:
        """Reflections and collision geoms off where the config says so. robosuite creates its render context
        at the first frame (this reset's): a frame rendered before the change is rendered again."""
        import mujoco

        context = getattr(self.env.sim, "_render_context_offscreen", None)
        if context is None:
            return
        changed = False
        if not self.config.reflections and context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION]:
            context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            changed = True
        if not self.config.draw_collision_geoms and context.vopt.geomgroup[COLLISION_GROUP]:
            context.vopt.geomgroup[COLLISION_GROUP] = 0
            changed = True
        if changed:
            self._obs = self.env._get_observations(force_update=True)

    def _hide_bodies(self, prefixes: list[str]) -> None:
        import mujoco

        model = self.env.sim.model._model
        bodies = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, b) or "" for b in model.geom_bodyid]
        for prefix in prefixes:
            geoms = [g for g, body in enumerate(bodies) if body.startswith(prefix)]
            if not geoms:
                self.env.close()
                raise ValueError(
                    f"unseen_bodies: no body of {self.config.task} with {self.config.robot} starts with {prefix!r} "
                    f"(bodies with geoms: {sorted(set(bodies))})"
                )
            model.geom_group[geoms] = HIDDEN_GROUP  # a group no render context draws; physics ignores groups

    def _image(self, img: np.ndarray) -> np.ndarray:
        if self._flip_rows:
            img = img[::-1]
        if self.config.rotate_images_180:
            # LIBERO-trained policies saw the renderer's bottom-up (OpenGL) frame rotated by 180 degrees,
            # which is the upright image mirrored left to right (as openpi's and OpenVLA's LIBERO evals do).
            img = img[:, ::-1]
        return np.ascontiguousarray(img, dtype=np.uint8)


__all__ = ["INSTRUCTIONS", "RobosuiteConfig", "RobosuiteEnv", "load_sim_config", "quat2axisangle"]
