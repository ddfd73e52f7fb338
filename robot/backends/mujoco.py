"""A UR5e in MuJoCo that follows the same servo commands as the real arm, with real physics.

The model is robosuite's UR5e MJCF and meshes (`robosuite/models/assets/robots/ur5e/robot.xml`), edited
with `mujoco.MjSpec`: its torque motors become joint position servos (stiff, critically damped, with rotor
armature), gravity is compensated the way the UR controller does it, a `tcp` site sits at the flange, and a
floor, lights and a block on a table give the cameras something to see.

servoL works like the controller's: each call moves a commanded joint configuration toward the target pose
by damped least-squares IK (from the commanded configuration, so it is smooth), clipped to the joint
limits; the position servos then drag the simulated arm along. servoStop decelerates the commanded joints
to rest at `decel`. Physics runs at its own timestep (2 ms), stepped by the servo loop in `wait_period`,
then the loop sleeps to the end of the period, so the simulated arm moves in real time.
"""

from __future__ import annotations

import math
import os
import time
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


def build_model(timestep: float = PHYSICS_DT) -> mujoco.MjModel:
    spec = mujoco.MjSpec.from_file(str(robosuite_ur5e_xml()))
    for act in list(spec.actuators):
        spec.delete(act)
    joints = [j for j in spec.joints if j.type == mujoco.mjtJoint.mjJNT_HINGE]
    for joint, kp in zip(joints, _KP, strict=True):
        joint.armature = _ARMATURE
        act = spec.add_actuator()
        act.name = joint.name
        act.target = joint.name
        act.trntype = mujoco.mjtTrn.mjTRN_JOINT
        act.set_to_position(kp=kp, kv=2.0 * math.sqrt(kp * (_ARMATURE + 0.5)))
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
    spec.option.timestep = timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.visual.global_.offwidth = 640
    spec.visual.global_.offheight = 480
    return spec.compile()


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
        self.model = m = build_model()
        self.data = mujoco.MjData(m)
        self.kin = mujoco.MjData(m)  # for IK at the commanded configuration
        self.site = m.site("tcp").id
        self.lo = m.jnt_range[:, 0].copy()
        self.hi = m.jnt_range[:, 1].copy()
        self.data.qpos[:] = self.start_q
        self.data.ctrl[:] = self.start_q
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
        return RobotState(
            tcp_pose=np.concatenate([pos, rot]),
            tcp_speed=speed,
            q=d.qpos[:6].copy(),
            qd=d.qvel[:6].copy(),
            gripper=self.gripper_width,
        )

    def fk(self, q: np.ndarray) -> np.ndarray:
        """Tool pose at joints `q` (no physics)."""
        self.kin.qpos[:] = q
        mujoco.mj_kinematics(self.model, self.kin)
        return np.concatenate(
            [self.kin.site_xpos[self.site], mat_to_rotvec(self.kin.site_xmat[self.site].reshape(3, 3))]
        )

    # -- commanding

    def servo_l(self, pose: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        m, k = self.model, self.kin
        q = self.q_cmd.copy()
        R_t = rotvec_to_mat(pose[3:])
        for _ in range(2):
            k.qpos[:] = q
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
            jac = np.vstack([self._jp, self._jr])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + _DAMPING * np.eye(6), err)
            q += np.clip(dq, -_MAX_IK_STEP, _MAX_IK_STEP)
        self._command_joints(np.clip(q, self.lo, self.hi), dt)

    def servo_j(self, q: np.ndarray, dt: float, lookahead_time: float, gain: float) -> None:
        self._command_joints(np.clip(np.asarray(q, dtype=float), self.lo, self.hi), dt)

    def _command_joints(self, q: np.ndarray, dt: float) -> None:
        self.qd_cmd = (q - self.q_cmd) / dt
        self.q_cmd = q
        self.data.ctrl[:] = q
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
        start, goal = self.data.qpos[:6].copy(), np.clip(np.asarray(q, dtype=float), self.lo, self.hi)
        steps = max(1, int(np.abs(goal - start).max() / speed / self.dt))
        for i in range(1, steps + 1):
            token = self.init_period()
            self.q_cmd = start + (goal - start) * i / steps
            self.data.ctrl[:] = self.q_cmd
            self.wait_period(token)
        self.qd_cmd[:] = 0.0

    # -- timing: physics advances here, then the clock catches up

    def init_period(self) -> float:
        return time.monotonic()

    def wait_period(self, token: float) -> None:
        if self.stop_decel is not None:  # decelerating after servoStop
            step = self.stop_decel * self.dt
            self.qd_cmd = np.sign(self.qd_cmd) * np.maximum(np.abs(self.qd_cmd) - step, 0.0)
            self.q_cmd = np.clip(self.q_cmd + self.qd_cmd * self.dt, self.lo, self.hi)
            self.data.ctrl[:] = self.q_cmd
        g_max = self.config.limits.gripper.max_speed * self.dt
        self.gripper_width += float(np.clip(self.gripper_target - self.gripper_width, -g_max, g_max))
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        if self.realtime:
            sleep_until(token + self.dt)


def render_setup() -> None:
    """Headless rendering defaults (EGL on Mesa when there is no display)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
