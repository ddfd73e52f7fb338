"""A UR5e in MuJoCo that follows the same servo commands as the real arm, with real physics.

Two scenes (`scene:` in the robot config):

- `static`: robosuite's UR5e MJCF and meshes (`robosuite/models/assets/robots/ur5e/robot.xml`) on the floor,
  a table and a block without contacts for the cameras to see, the `tcp` site at the flange, no gripper
  (its width is only simulated as a number). Base frame = MuJoCo world frame.
- `lift`: robosuite's own Lift task with a UR5e (`robosuite.make("Lift", robots="UR5e")`'s MJCF): the
  arena, table (top at z 0.8), lights, textures, the cube (a free body with robosuite's contacts and
  friction; its size fixed at the middle of robosuite's random range, `LIFT_CUBE_HALF`), the UR5e on its
  mount where robosuite puts it, the Robotiq85 gripper and the `robot0_eye_in_hand` camera. The tool
  point is robosuite's `grip_site` (what robosuite reports as `robot0_eef_pos`), the base frame is
  robosuite's world frame, and `state()` also reports what robosuite's observation holds: the eef body's
  quaternion (`robot0_eef_quat`) and the gripper joints, so a policy trained in robosuite sees the same
  numbers. The gripper's two position actuators are robosuite's own, driven from the commanded width:
  ctrl = 0.8 * (max - width) / (max - min), i.e. exactly the ctrl robosuite's gripper controller sets for
  action -g when the width is the open_positive mapping of g (robot/actions.py).

Both scenes get the same edits with `mujoco.MjSpec`: the arm's torque motors become joint position servos
(stiff, critically damped, with rotor armature), and gravity is compensated on the robot's bodies the way
the UR controller does it.

servoL works like the controller's: each call moves a commanded joint configuration toward the target pose
by damped least-squares IK (from the commanded configuration, so it is smooth), clipped to the joint
limits; the position servos then drag the simulated arm along. servoStop decelerates the commanded joints
to rest at `decel`. Physics runs at its own timestep (2 ms), stepped by the servo loop in `wait_period`,
then the loop sleeps to the end of the period, so the simulated arm moves in real time.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

from robot.backends.base import Backend, RobotState, sleep_until
from robot.config import RobotConfig
from robot.geometry import mat_to_rotvec, rotvec_to_mat

PHYSICS_DT = 0.002
_KP = (3000.0, 3000.0, 2000.0, 500.0, 500.0, 200.0)  # N m / rad per joint
_ARMATURE = 0.1  # kg m^2 reflected rotor inertia: keeps the stiff servos stable at a 2 ms step
_DAMPING = 1e-3  # DLS damping (lambda^2)
_MAX_IK_STEP = 0.05  # rad per servo call: a target the arm cannot reach smoothly is not jumped to


def robosuite_ur5e_xml() -> Path:
    """robosuite's UR5e MJCF (meshes beside it). robosuite is imported only to find its files."""
    import importlib.util

    spec = importlib.util.find_spec("robosuite")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the MuJoCo backend needs robosuite's UR5e model: pip install robosuite==1.5.2 --no-deps"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models/assets/robots/ur5e/robot.xml"
    if not path.is_file():
        raise FileNotFoundError(f"robosuite has no UR5e model at {path}")
    return path


SCENES = ("static", "lift")
LIFT_CUBE_HALF = 0.021  # m: robosuite's Lift draws the cube's half size from [0.020, 0.022]
LIFT_TABLE_TOP = 0.8  # m: robosuite's Lift table top (world z)
LIFT_GRIPPERS = ("Robotiq85Gripper", "Robotiq140Gripper", "PandaGripper")  # robosuite's gripper_types


@dataclass(frozen=True)
class Scene:
    """A compiled twin scene and the names the backend and the cameras need in it."""

    name: str
    model: mujoco.MjModel
    tcp_site: str  # the tool point the pose is read at and servoL aims
    arm_joints: tuple[str, ...]
    arm_actuators: tuple[str, ...]
    eef_body: str | None = None  # robosuite's eef body (robot0_eef_quat is its orientation)
    gripper_joints: tuple[str, ...] = ()  # robosuite's order (robot0_gripper_qpos)
    gripper_actuators: tuple[str, ...] = ()
    gripper_q0: tuple[float, ...] = ()  # the gripper's joints as robosuite resets them
    gripper_ctrl_open: tuple[float, ...] = ()  # its actuators' controls, held open / held closed in robosuite
    gripper_ctrl_closed: tuple[float, ...] = ()
    cube_joint: str | None = None

    def qpos0(self) -> np.ndarray:
        """The scene's rest configuration without the arm (gripper open as robosuite resets it, cube on the
        table centre)."""
        m = self.model
        q = m.qpos0.copy()
        for name, value in zip(self.gripper_joints, self.gripper_q0, strict=True):
            q[m.joint(name).qposadr[0]] = value
        if self.cube_joint is not None:
            a = m.joint(self.cube_joint).qposadr[0]
            q[a : a + 7] = [0.0, 0.0, LIFT_TABLE_TOP + LIFT_CUBE_HALF, 1.0, 0.0, 0.0, 0.0]
        return q


def _servo_arm(spec: mujoco.MjSpec, joints: list, timestep: float) -> list[str]:
    """Position servos on the arm's joints (named as the joints), timestep and integrator for them."""
    names = []
    for joint, kp in zip(joints, _KP, strict=True):
        joint.armature = _ARMATURE
        act = spec.add_actuator()
        act.name = joint.name
        act.target = joint.name
        act.trntype = mujoco.mjtTrn.mjTRN_JOINT
        act.set_to_position(kp=kp, kv=2.0 * math.sqrt(kp * (_ARMATURE + 0.5)))
        names.append(joint.name)
    spec.option.timestep = timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.visual.global_.offwidth = max(spec.visual.global_.offwidth, 640)
    spec.visual.global_.offheight = max(spec.visual.global_.offheight, 480)
    return names


def build_scene(
    scene: str = "static", timestep: float = PHYSICS_DT, gripper: str = "Robotiq85Gripper"
) -> Scene:
    """The twin's MuJoCo model for `scene` ("static" or "lift", with robosuite's `gripper`); see the module
    docstring."""
    if scene == "lift":
        if gripper not in LIFT_GRIPPERS:
            raise ValueError(f"unknown lift scene gripper {gripper!r}; expected one of {LIFT_GRIPPERS}")
        return _lift_scene(timestep, gripper)
    if scene != "static":
        raise ValueError(f"unknown MuJoCo scene {scene!r}; expected one of {SCENES}")
    spec = mujoco.MjSpec.from_file(str(robosuite_ur5e_xml()))
    for act in list(spec.actuators):
        spec.delete(act)
    joints = [j for j in spec.joints if j.type == mujoco.mjtJoint.mjJNT_HINGE]
    for body in spec.bodies:
        body.gravcomp = 1.0  # the UR controller compensates gravity; the servos then only track
    hand = spec.body("right_hand")
    tcp = hand.add_site()
    tcp.name = "tcp"
    world = spec.worldbody
    floor = world.add_geom()
    floor.type = mujoco.mjtGeom.mjGEOM_PLANE
    floor.size = [2.0, 2.0, 0.1]
    floor.pos = [0.0, 0.0, -0.01]
    floor.rgba = [0.55, 0.55, 0.5, 1.0]
    floor.contype = floor.conaffinity = 0
    table = world.add_geom()
    table.type = mujoco.mjtGeom.mjGEOM_BOX
    table.size = [0.25, 0.35, 0.05]
    table.pos = [0.55, 0.1, 0.05]
    table.rgba = [0.6, 0.45, 0.3, 1.0]
    table.contype = table.conaffinity = 0
    block = world.add_geom()
    block.type = mujoco.mjtGeom.mjGEOM_BOX
    block.size = [0.025, 0.025, 0.025]
    block.pos = [0.5, 0.15, 0.125]
    block.rgba = [0.85, 0.2, 0.2, 1.0]
    block.contype = block.conaffinity = 0
    light = world.add_light()
    light.pos = [0.5, 0.0, 2.0]
    light.dir = [0.0, 0.0, -1.0]
    front = world.add_camera()
    front.name = "front"
    front.pos = [1.5, 0.1, 0.7]
    front.alt.type = mujoco.mjtOrientation.mjORIENTATION_XYAXES
    front.alt.xyaxes = [0.0, 1.0, 0.0, -0.35, 0.0, 0.94]
    arm = _servo_arm(spec, joints, timestep)
    return Scene("static", spec.compile(), "tcp", tuple(arm), tuple(arm))


def build_model(scene: str = "static", timestep: float = PHYSICS_DT) -> mujoco.MjModel:
    return build_scene(scene, timestep).model


def config_scene(config: RobotConfig) -> Scene:
    """The scene a robot config asks for."""
    return build_scene(config.scene, gripper=config.scene_gripper)


@functools.cache
def robosuite_lift_ur5e_xml(gripper: str = "Robotiq85Gripper") -> tuple[str, dict]:
    """robosuite's Lift-with-UR5e MJCF (absolute asset paths) with `gripper` (robosuite's gripper_types),
    and what the twin needs to know of it: robosuite's names for its parts, the gripper's rest joints and
    the actuator controls robosuite's gripper controller settles at for a held "open" and "close"."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import robosuite
    except ImportError as e:
        raise ImportError(
            "the MuJoCo twin's lift scene is robosuite's Lift: pip install robosuite==1.5.2 --no-deps"
        ) from e
    env = robosuite.make(
        "Lift", robots="UR5e", gripper_types=gripper, has_renderer=False, has_offscreen_renderer=False,
        use_camera_obs=False, ignore_done=True, hard_reset=False,
    )  # fmt: skip
    try:
        robot = env.robots[0]
        grip = robot.gripper["right"]
        sim = env.sim
        ctrl_range = np.array(
            [sim.model.actuator_ctrlrange[sim.model.actuator_name2id(a)] for a in grip.actuators]
        )

        def held(action: float) -> list[float]:  # robosuite's Robot.grip_action after the action is held
            grip.current_action = np.zeros(grip.dof)
            for _ in range(100):
                formatted = grip.format_action(np.array([action]))
            bias, weight = ctrl_range.mean(axis=1), (ctrl_range[:, 1] - ctrl_range[:, 0]) / 2
            return (bias + weight * formatted).tolist()

        names = {
            "arm_joints": tuple(robot.robot_joints),
            "arm_motors": tuple(robot.robot_model.actuators),
            "eef_body": robot.robot_model.eef_name["right"],
            "tcp_site": sim.model.site_id2name(robot.eef_site_id["right"]),
            "gripper_joints": tuple(grip.joints),
            "gripper_actuators": tuple(grip.actuators),
            "gripper_q0": tuple(float(x) for x in grip.init_qpos),
            "gripper_ctrl_open": tuple(held(-1.0)),  # robosuite's gripper action: -1 open, +1 close
            "gripper_ctrl_closed": tuple(held(1.0)),
            "cube_joint": env.cube.joints[0],
            "cube_geoms": tuple(env.cube.contact_geoms + env.cube.visual_geoms),
        }
        return env.model.get_xml(), names
    finally:
        env.close()


def _lift_scene(timestep: float, gripper: str) -> Scene:
    xml, names = robosuite_lift_ur5e_xml(gripper)
    spec = mujoco.MjSpec.from_string(xml)
    for name in names["arm_motors"]:
        spec.delete(spec.actuator(name))
    for body in spec.bodies:
        if body.name.startswith(("robot0_", "gripper0_")):
            body.gravcomp = 1.0  # the UR controller compensates the arm's and the tool's weight
    for name in names["cube_geoms"]:
        spec.geom(name).size = [LIFT_CUBE_HALF] * 3
    for site in spec.sites:  # robosuite hides every site at reset (its visualize(False))
        site.rgba = [*site.rgba[:3], 0.0]
    arm = _servo_arm(spec, [spec.joint(n) for n in names["arm_joints"]], timestep)
    fields = set(Scene.__dataclass_fields__)  # robosuite's names the scene keeps, under the same keys
    return Scene(
        "lift", spec.compile(), arm_actuators=tuple(arm), **{k: v for k, v in names.items() if k in fields}
    )


class MujocoBackend(Backend):
    """The simulated arm. Everything runs in the calling process (the servo process)."""

    def __init__(self, config: RobotConfig, *, start_q: np.ndarray | None = None, realtime: bool = True):
        self.config = config
        self.controller_hz = config.controller_hz
        self.dt = config.dt
        self.realtime = realtime  # False: wait_period only steps physics (tests that need no clock)
        self.start_q = np.array(config.home_q if start_q is None else start_q, dtype=float)
        self.model: mujoco.MjModel | None = None
        self.servoing = False
        self.servo_calls = 0
        self.stop_calls = 0

    # -- lifecycle

    def connect(self) -> None:
        self.scene = scene = config_scene(self.config)
        self.model = m = scene.model
        self.data = mujoco.MjData(m)
        self.kin = mujoco.MjData(m)  # for IK at the commanded configuration
        self.site = m.site(scene.tcp_site).id
        self.arm_q = np.array([m.joint(n).qposadr[0] for n in scene.arm_joints])
        self.arm_v = np.array([m.joint(n).dofadr[0] for n in scene.arm_joints])
        self.arm_ctrl = np.array([m.actuator(n).id for n in scene.arm_actuators])
        self.finger_ctrl = np.array([m.actuator(n).id for n in scene.gripper_actuators], dtype=int)
        self.finger_open = np.array(scene.gripper_ctrl_open)
        self.finger_closed = np.array(scene.gripper_ctrl_closed)
        self.gripper_q = np.array([m.joint(n).qposadr[0] for n in scene.gripper_joints], dtype=int)
        self.eef_body = m.body(scene.eef_body).id if scene.eef_body else None
        self.lo = m.jnt_range[[m.joint(n).id for n in scene.arm_joints], 0].copy()
        self.hi = m.jnt_range[[m.joint(n).id for n in scene.arm_joints], 1].copy()
        self.data.qpos[:] = scene.qpos0()
        self.data.qpos[self.arm_q] = self.start_q
        self.data.ctrl[self.arm_ctrl] = self.start_q
        mujoco.mj_forward(m, self.data)
        self.q_cmd = self.start_q.copy()
        self.qd_cmd = np.zeros(6)
        self.stop_decel: float | None = None
        self.substeps = max(1, round(self.dt / m.opt.timestep))
        self._jp = np.zeros((3, m.nv))
        self._jr = np.zeros((3, m.nv))
        self._vel = np.zeros(6)
        self.gripper_width = self.config.limits.gripper.max
        self.gripper_target = self.gripper_width
        self._drive_fingers()

    def disconnect(self) -> None:
        self.servoing = False

    def reconnect(self) -> bool:
        return self.model is not None

    # -- reading

    def state(self) -> RobotState:
        m, d = self.model, self.data
        pos = d.site_xpos[self.site].copy()
        rot = mat_to_rotvec(d.site_xmat[self.site].reshape(3, 3))
        mujoco.mj_objectVelocity(m, d, mujoco.mjtObj.mjOBJ_SITE, self.site, self._vel, 0)
        speed = np.concatenate([self._vel[3:], self._vel[:3]])  # MuJoCo gives [angular, linear]
        eef_quat = None
        if self.eef_body is not None:  # robosuite's robot0_eef_quat: the eef body's, wxyz -> xyzw
            eef_quat = d.xquat[self.eef_body][[1, 2, 3, 0]].copy()
        return RobotState(
            tcp_pose=np.concatenate([pos, rot]),
            tcp_speed=speed,
            q=d.qpos[self.arm_q].copy(),
            qd=d.qvel[self.arm_v].copy(),
            gripper=self.gripper_width,
            eef_quat=eef_quat,
            gripper_joints=d.qpos[self.gripper_q].copy() if self.gripper_q.size else None,
            sim_qpos=d.qpos.copy() if self.scene.name != "static" else None,
        )

    def fk(self, q: np.ndarray) -> np.ndarray:
        """Tool pose at joints `q` (no physics)."""
        self.kin.qpos[self.arm_q] = q
        mujoco.mj_kinematics(self.model, self.kin)
        return np.concatenate(
            [self.kin.site_xpos[self.site], mat_to_rotvec(self.kin.site_xmat[self.site].reshape(3, 3))]
        )

    # -- commanding

    def servo_l(self, pose: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        m, k = self.model, self.kin
        q = self.q_cmd.copy()
        R_t = rotvec_to_mat(pose[3:])
        k.qpos[:] = self.data.qpos  # the gripper's joints as they are; the arm's at the command
        for _ in range(2):
            k.qpos[self.arm_q] = q
            mujoco.mj_kinematics(m, k)
            mujoco.mj_comPos(m, k)
            err = np.concatenate(
                [
                    pose[:3] - k.site_xpos[self.site],
                    mat_to_rotvec(R_t @ k.site_xmat[self.site].reshape(3, 3).T),
                ]
            )
            if float(np.abs(err).max()) < 1e-7:
                break
            mujoco.mj_jacSite(m, k, self._jp, self._jr, self.site)
            jac = np.vstack([self._jp[:, self.arm_v], self._jr[:, self.arm_v]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + _DAMPING * np.eye(6), err)
            q += np.clip(dq, -_MAX_IK_STEP, _MAX_IK_STEP)
        self._command_joints(np.clip(q, self.lo, self.hi), dt)

    def servo_j(self, q: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        self._command_joints(np.clip(np.asarray(q, dtype=float), self.lo, self.hi), dt)

    def _command_joints(self, q: np.ndarray, dt: float) -> None:
        self.qd_cmd = (q - self.q_cmd) / dt
        self.q_cmd = q
        self.data.ctrl[self.arm_ctrl] = q
        self.servoing = True
        self.stop_decel = None
        self.servo_calls += 1

    def servo_stop(self, decel: float) -> None:
        self.servoing = False
        self.stop_decel = decel
        self.stop_calls += 1

    def gripper(self, width: float) -> None:
        self.gripper_target = float(width)

    def move_j(self, q: np.ndarray, speed: float = 0.5, accel: float = 1.0) -> None:
        self.servo_stop(accel)
        start, goal = self.data.qpos[self.arm_q].copy(), np.clip(np.asarray(q, dtype=float), self.lo, self.hi)
        steps = max(1, int(np.abs(goal - start).max() / speed / self.dt))
        for i in range(1, steps + 1):
            token = self.init_period()
            self.q_cmd = start + (goal - start) * i / steps
            self.data.ctrl[self.arm_ctrl] = self.q_cmd
            self.wait_period(token)
        self.qd_cmd[:] = 0.0

    def _drive_fingers(self) -> None:
        """The gripper's actuators (lift scene) from the width: robosuite's held-open controls at
        limits.gripper.max, its held-closed controls at min, linear in between."""
        if self.finger_ctrl.size:
            g = self.config.limits.gripper
            closed = min(max((g.max - self.gripper_width) / (g.max - g.min), 0.0), 1.0)
            self.data.ctrl[self.finger_ctrl] = self.finger_open + closed * (
                self.finger_closed - self.finger_open
            )

    # -- timing: physics advances here, then the clock catches up

    def init_period(self) -> float:
        return time.monotonic()

    def wait_period(self, token: float) -> None:
        if self.stop_decel is not None:  # decelerating after servoStop
            step = self.stop_decel * self.dt
            self.qd_cmd = np.sign(self.qd_cmd) * np.maximum(np.abs(self.qd_cmd) - step, 0.0)
            self.q_cmd = np.clip(self.q_cmd + self.qd_cmd * self.dt, self.lo, self.hi)
            self.data.ctrl[self.arm_ctrl] = self.q_cmd
        g_max = self.config.limits.gripper.max_speed * self.dt
        self.gripper_width += float(np.clip(self.gripper_target - self.gripper_width, -g_max, g_max))
        self._drive_fingers()
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        if self.realtime:
            sleep_until(token + self.dt)


def render_setup() -> None:
    """Headless rendering defaults (EGL on Mesa when there is no display)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
