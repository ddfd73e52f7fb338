"""Robot configs (`vla_steer/configs/robots/*.yaml`, or your own): limits, fault behaviour and the policy's
action convention.

Validated by pydantic through `vla_steer.core.config.load_yaml_model`, so a bad file fails with its path, the
key and what was allowed ("my_ur5e.yaml: action.convention: Input should be 'ee_delta', ..."), and
a key given twice is refused. Torch-free: the servo process imports it.

No safety setting can switch its safeguard off: every number is finite (`.inf` is refused everywhere),
every safety field has a range, and the arm's ranges come from the UR5/UR5e datasheets (every joint
+-360 deg at most 180 deg/s; tool speed 1 m/s typical; reach 0.85 m). Joint acceleration has no datasheet
figure: 40 rad/s^2 is the controller's own bound (ur_rtde's UR_JOINT_ACCELERATION_MAX).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vla_steer.core.config import load_yaml_model, resolve_config

N_JOINTS = 6
UR_JOINT_RANGE = 2 * math.pi + 1e-3  # rad: +-360 deg (with room for the configs' 6.2832)
UR_JOINT_SPEED = math.pi  # rad/s: 180 deg/s, every joint, UR5 and UR5e
UR_JOINT_ACCEL = 40.0  # rad/s^2: the controller's bound
UR_TCP_SPEED = 1.0  # m/s
UR_WORKSPACE = 1.2  # m from the base on each axis: reach 0.85 m plus a tool
GRIPPER_STROKE = 0.085  # m, Robotiq 2F-85
GRIPPER_SPEED = 0.15  # m/s, Robotiq 2F-85: 20..150 mm/s

Coordinate = Annotated[float, Field(ge=-UR_WORKSPACE, le=UR_WORKSPACE)]
JointAngle = Annotated[float, Field(ge=-UR_JOINT_RANGE, le=UR_JOINT_RANGE)]
JointSpeed = Annotated[float, Field(gt=0, le=UR_JOINT_SPEED)]
JointAccel = Annotated[float, Field(gt=0, le=UR_JOINT_ACCEL)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf, no .nan


class Workspace(_Strict):
    """An axis-aligned box in the robot's base frame (metres) the tool centre point must stay inside."""

    min: tuple[Coordinate, Coordinate, Coordinate]
    max: tuple[Coordinate, Coordinate, Coordinate]

    @model_validator(mode="after")
    def _ordered(self) -> Workspace:
        if any(lo >= hi for lo, hi in zip(self.min, self.max, strict=True)):
            raise ValueError(f"workspace.min {list(self.min)} must be below workspace.max {list(self.max)}")
        return self


class GripperLimits(_Strict):
    min: float = Field(0.0, ge=0, le=GRIPPER_STROKE)  # opening width in metres (Robotiq 2F-85: 0 .. 0.085)
    max: float = Field(GRIPPER_STROKE, ge=0, le=GRIPPER_STROKE)
    max_speed: float = Field(GRIPPER_SPEED, gt=0, le=GRIPPER_SPEED)  # m/s of opening width

    @model_validator(mode="after")
    def _ordered(self) -> GripperLimits:
        if self.min >= self.max:
            raise ValueError(f"gripper.min {self.min} must be below gripper.max {self.max}")
        return self


class Limits(_Strict):
    """What the safety filter enforces on every command (see robot/safety.py)."""

    workspace: Workspace
    max_linear_speed: float = Field(0.25, gt=0, le=UR_TCP_SPEED)  # m/s
    max_linear_accel: float = Field(2.0, gt=0, le=20.0)  # m/s^2
    max_angular_speed: float = Field(1.0, gt=0, le=UR_JOINT_SPEED)  # rad/s
    max_angular_accel: float = Field(6.0, gt=0, le=60.0)  # rad/s^2
    joint_min: tuple[JointAngle, JointAngle, JointAngle, JointAngle, JointAngle, JointAngle]
    joint_max: tuple[JointAngle, JointAngle, JointAngle, JointAngle, JointAngle, JointAngle]
    max_joint_speed: tuple[JointSpeed, JointSpeed, JointSpeed, JointSpeed, JointSpeed, JointSpeed] = (
        1.0,
    ) * N_JOINTS  # rad/s
    max_joint_accel: tuple[JointAccel, JointAccel, JointAccel, JointAccel, JointAccel, JointAccel] = (
        4.0,
    ) * N_JOINTS  # rad/s^2
    gripper: GripperLimits = GripperLimits()

    @model_validator(mode="after")
    def _check(self) -> Limits:
        for i, (lo, hi) in enumerate(zip(self.joint_min, self.joint_max, strict=True)):
            if lo >= hi:
                raise ValueError(f"joint_min[{i}] {lo} must be below joint_max[{i}] {hi}")
        return self


class Faults(_Strict):
    """Fail-safe timings."""

    max_action_age: float = Field(
        0.6, gt=0, le=5.0
    )  # s since the chunk's observation; older -> hold position
    # s without a heartbeat reply -> servoStop (latched). A killed policy node is seen at once (its TCP
    # connection drops); this bounds a hung node or a cut network.
    policy_liveness: float = Field(0.1, gt=0, le=2.0)
    heartbeat_interval: float = Field(0.02, gt=0, le=0.5)  # s between liveness pings to the policy node
    # ur_rtde watchdog: the robot stops if kicked less often (kicked every servo period; at most its rate)
    watchdog_min_hz: float = Field(20.0, ge=10.0, le=500.0)
    stop_decel: float = Field(4.0, ge=1.0, le=40.0)  # servoStop deceleration (m/s^2 servoL, rad/s^2 servoJ)
    reconnect_interval: float = Field(1.0, ge=0.1, le=60.0)  # s between reconnect attempts after a fault
    joint_margin: float = Field(0.02, ge=0, le=0.5)  # rad; actual joints this close to a limit -> fault stop
    # A resume takes effect once the measured TCP speed is below these (the arm at rest after servoStop),
    # and is dropped if that takes longer than resume_timeout.
    rest_linear_speed: float = Field(0.005, gt=0, le=0.05)  # m/s
    rest_angular_speed: float = Field(0.05, gt=0, le=0.5)  # rad/s
    resume_timeout: float = Field(10.0, ge=0.5, le=60.0)  # s

    @model_validator(mode="after")
    def _check(self) -> Faults:
        if self.heartbeat_interval * 2 > self.policy_liveness:
            raise ValueError(
                f"faults.heartbeat_interval {self.heartbeat_interval} must be at most half of "
                f"faults.policy_liveness {self.policy_liveness} (one lost ping must not stop the arm)"
            )
        return self


class ServoParams(_Strict):
    """ur_rtde servoL/servoJ arguments (speed and acceleration are unused by UR in servo mode)."""

    lookahead_time: float = Field(0.1, ge=0.03, le=0.2)
    gain: float = Field(300.0, ge=100, le=2000)


class Gripper(_Strict):
    """Where the gripper command is in the action vector and what its value means."""

    index: int | None = 6  # None: the policy has no gripper output
    # open_positive: +1 open .. -1 closed (robosuite style); close_positive: 1 closed .. 0 open (OpenVLA
    # after its inversion); width: metres directly.
    convention: Literal["open_positive", "close_positive", "width"] = "close_positive"


class Action(_Strict):
    """How an action vector from the policy becomes a robot target."""

    # ee_delta: [dx dy dz, rotation delta, gripper]; ee_absolute: [x y z, rotation, gripper];
    # joint_absolute / joint_delta: [6 joints, gripper].
    convention: Literal["ee_delta", "ee_absolute", "joint_absolute", "joint_delta"] = "ee_delta"
    rotation: Literal["rpy", "rotvec", "none"] = "rpy"  # the rotation part of ee_* actions
    frame: Literal["base", "tool"] = "base"  # deltas expressed in the base or the tool frame
    translation_scale: float = Field(1.0, gt=0)  # metres per action unit
    rotation_scale: float = Field(1.0, gt=0)  # radians per action unit
    gripper: Gripper = Gripper()
    control_hz: float | None = Field(None, gt=0)  # seconds per chunk step = 1/control_hz; default: policy's
    execute: int | None = Field(None, ge=1)  # chunk steps executed before re-planning; default: all

    @property
    def joints(self) -> bool:
        return self.convention.startswith("joint")


class Camera(_Strict):
    """One policy image key's camera (robot/cameras.py)."""

    source: Literal["mujoco", "blank", "opencv", "realsense", "recorded"] = "mujoco"
    camera: str = "robotview"  # mujoco: the scene's camera name
    device: int | str = 0  # opencv: index or /dev/videoN (or a video file); realsense: serial ("" = first)
    path: str | None = None  # recorded: a .npy of frames [n, H, W, 3] uint8
    at_end: Literal["loop", "stall", "drop"] = "loop"  # recorded: what happens after the last frame
    width: int = Field(640, ge=16, le=4096)  # the camera's resolution (the policy's size is resized to)
    height: int = Field(480, ge=16, le=4096)
    fps: float = Field(30.0, ge=1.0, le=120.0)
    # The node holds the arm (as for a stale action) when the newest frame is older than this, or more than
    # max_dropped grabs in a row failed; it follows fresh chunks again once frames flow.
    max_frame_age: float = Field(0.2, gt=0, le=1.0)  # s
    max_dropped: int = Field(5, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> Camera:
        if self.source == "recorded" and not self.path:
            raise ValueError("a recorded camera needs path: FRAMES.npy")
        if self.source in ("opencv", "realsense", "recorded") and self.max_frame_age < 1.5 / self.fps:
            raise ValueError(
                f"max_frame_age {self.max_frame_age} s is shorter than 1.5 frames at {self.fps:g} fps"
            )
        return self


class GripperDevice(_Strict):
    """The gripper on the real arm (robot/gripper.py); the MuJoCo twin simulates its width."""

    driver: Literal["robotiq_2f85"] = "robotiq_2f85"
    host: str | None = None  # the Robotiq URCap's socket; default: the robot's --host (it runs there)
    port: int = Field(63352, ge=1, le=65535)
    force: float = Field(60.0, ge=20.0, le=235.0)  # N, the 2F-85's grip force range


class Observation(_Strict):
    cameras: dict[str, Camera] = {}  # policy image key -> source; keys the policy wants but lacks: blank
    # The state sent to a policy that takes one (its hello reply's state_dim):
    # - eef_pos_axisangle_gripper: tool pose (position, rotation vector) + [width, -width]: an arm without
    #   finger joint readings (the real UR with a Robotiq 2F-85);
    # - robosuite_eef_pos_axisangle_fingers: what robosuite's env sends (sim/robosuite_env.py): robot0_eef_pos
    #   + axis-angle of robot0_eef_quat + the gripper's two driver joints; the MuJoCo twin's lift scene only;
    # - joints_gripper: the 6 joints + width.
    state: Literal[
        "none", "eef_pos_axisangle_gripper", "robosuite_eef_pos_axisangle_fingers", "joints_gripper"
    ] = "none"
    prompt: str = "pick up the object"


class RobotConfig(_Strict):
    name: str = "ur5e"
    model: Literal["ur5e", "ur5"] = "ur5e"
    controller_hz: float = Field(500.0, ge=10.0, le=500.0)  # e-Series up to 500 Hz, CB3 up to 125 Hz
    servo: Literal["servoL", "servoJ"] = "servoL"
    servo_params: ServoParams = ServoParams()
    home_q: tuple[float, float, float, float, float, float]
    limits: Limits
    faults: Faults = Faults()
    action: Action = Action()
    observation: Observation = Observation()
    gripper: GripperDevice | None = None  # None: no gripper driver (the width is still filtered)
    # The MuJoCo twin's scene (robot/backends/mujoco.py; the mujoco backend only): static = the arm over a
    # table with a block without contacts; lift = robosuite's Lift with a UR5e and its Robotiq85 gripper,
    # in robosuite's world frame (table top at z 0.8), a cube to lift, robosuite's cameras.
    scene: Literal["static", "lift"] = "static"
    # The lift scene's gripper, one of robosuite's gripper_types: what the policy was trained with.
    # robosuite 1.5's Robotiq85Gripper (its UR5e default) jams open at about 5 cm and cannot grasp the cube
    # (robosuite issue #772); Robotiq140Gripper and PandaGripper grasp it.
    scene_gripper: Literal["Robotiq85Gripper", "Robotiq140Gripper", "PandaGripper"] = "Robotiq85Gripper"

    @model_validator(mode="after")
    def _check(self) -> RobotConfig:
        if self.model == "ur5" and self.controller_hz > 125:
            raise ValueError(
                f"controller_hz {self.controller_hz:g}: a UR5 (CB3) controller runs at most 125 Hz"
            )
        if self.faults.watchdog_min_hz > self.controller_hz:
            raise ValueError(
                f"faults.watchdog_min_hz {self.faults.watchdog_min_hz:g} is above controller_hz "
                f"{self.controller_hz:g}: the loop kicks the watchdog once per period"
            )
        if self.observation.state == "robosuite_eef_pos_axisangle_fingers" and self.scene != "lift":
            raise ValueError(
                "observation.state 'robosuite_eef_pos_axisangle_fingers' needs the finger joints of the "
                f"MuJoCo twin's scene: lift (got scene: {self.scene}); a real arm sends eef_pos_axisangle_gripper"
            )
        if self.scene == "lift" and self.model != "ur5e":
            raise ValueError(f"scene 'lift' is robosuite's Lift with a UR5e; model is {self.model!r}")
        lo, hi = self.limits.joint_min, self.limits.joint_max
        bad = [i for i, q in enumerate(self.home_q) if not lo[i] <= q <= hi[i]]
        if bad:
            raise ValueError(f"home_q joints {bad} are outside limits.joint_min/joint_max")
        if self.action.joints != (self.servo == "servoJ"):
            want = "servoJ" if self.action.joints else "servoL"
            raise ValueError(
                f"action.convention {self.action.convention!r} needs servo: {want} (got {self.servo!r})"
            )
        return self

    @property
    def dt(self) -> float:
        return 1.0 / self.controller_hz


def load_robot_config(path: str | Path) -> RobotConfig:
    """A robot config by path, or by the name of a shipped one ("ur5e_mujoco")."""
    path = resolve_config(path, "robots")
    _not_a_sim_config(path)
    return load_yaml_model(path, RobotConfig, "robot config")


def _not_a_sim_config(path: Path) -> None:
    """A sim config passed as a robot config gets one sentence, not a list of every key it should not have."""
    import yaml

    try:
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind")
    except (OSError, yaml.YAMLError, AttributeError):
        return  # the loader says what is wrong with the file
    if kind in ("robosuite", "libero"):
        raise ValueError(
            f"{path} is a sim config (kind: {kind}): run it with `vla-steer sim --env {path}`; a robot config "
            "describes a UR5 cell, like the shipped ur5e.yaml (vla_steer/configs/robots)"
        )


def safety_summary(cfg: RobotConfig, source: str | Path | None = None) -> str:
    """The loaded safety settings, one `key: value` line each (printed at the start of `vla-steer robot`)."""

    def lines(prefix: str, d: dict) -> list[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += lines(f"{prefix}{k}.", v)
            else:
                out.append(f"  {prefix}{k}: {list(v) if isinstance(v, tuple) else v}")
        return out

    head = f"safety settings of {cfg.name} ({cfg.model}, {cfg.controller_hz:g} Hz, {cfg.servo})"
    body = [
        *lines("limits.", cfg.limits.model_dump()),
        *lines("faults.", cfg.faults.model_dump()),
        *lines("servo_params.", cfg.servo_params.model_dump()),
    ]
    return "\n".join([head + (f" from {source}:" if source else ":"), *body])
