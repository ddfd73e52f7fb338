"""The safety filter: any input (NaN, inf, huge included) comes out inside the limits. Plus robot configs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from robot.config import RobotConfig, load_robot_config
from robot.geometry import mat_to_rotvec, rotvec_to_mat, rpy_to_mat
from robot.safety import GripperFilter, JointFilter, JointGuard, PoseFilter, brake_speed
from vla_steer.core.config import shipped

ROBOTS = shipped("robots")
CFG = load_robot_config(ROBOTS / "ur5e_mujoco.yaml")
LIM = CFG.limits
DT = CFG.dt
TOL = 1e-9

# Any float, including the awkward ones, mixed with plausible values so both kinds of step happen.
wild = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 1e-308, math.pi, -math.pi, 2 * math.pi]),
    st.floats(-2.0, 2.0),
)
pose_targets = st.lists(st.lists(wild, min_size=6, max_size=6), min_size=1, max_size=60)


def _start_pose() -> np.ndarray:
    lo, hi = np.array(LIM.workspace.min), np.array(LIM.workspace.max)
    return np.array([*((lo + hi) / 2), math.pi, 0.0, 0.0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pose_targets, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_pose_filter_output_always_inside_limits(targets, fx, fy, fz):
    lo, hi = np.array(LIM.workspace.min), np.array(LIM.workspace.max)
    start = _start_pose()
    start[:3] = lo + np.array([fx, fy, fz]) * (hi - lo)  # anywhere in the box, walls included
    f = PoseFilter(LIM, DT)
    f.reset(start)
    prev, v_prev, w_prev = start, np.zeros(3), np.zeros(3)
    # Drive toward each target for a few steps (a target held, as the servo loop does between chunks).
    for t in targets:
        for _ in range(3):
            out = f(np.array(t, dtype=float))
            assert out.shape == (6,) and np.all(np.isfinite(out))
            assert np.all(out[:3] >= lo - TOL) and np.all(out[:3] <= hi + TOL)
            v = (out[:3] - prev[:3]) / DT
            w = mat_to_rotvec(rotvec_to_mat(out[3:]) @ rotvec_to_mat(prev[3:]).T) / DT
            assert np.linalg.norm(v) <= LIM.max_linear_speed * (1 + 1e-9) + TOL
            assert np.linalg.norm(v - v_prev) <= LIM.max_linear_accel * DT * (1 + 1e-6) + 1e-7
            assert np.linalg.norm(w) <= LIM.max_angular_speed * (1 + 1e-6) + 1e-7
            assert np.linalg.norm(w - w_prev) <= LIM.max_angular_accel * DT * (1 + 1e-6) + 1e-6
            prev, v_prev, w_prev = out, v, w


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(wild, min_size=6, max_size=6), min_size=1, max_size=60), st.floats(0.0, 1.0))
def test_joint_filter_output_always_inside_limits(targets, frac):
    lo, hi = np.array(LIM.joint_min), np.array(LIM.joint_max)
    vmax, amax = np.array(LIM.max_joint_speed), np.array(LIM.max_joint_accel)
    f = JointFilter(LIM, DT)
    q0 = lo + frac * (hi - lo)
    f.reset(q0)
    prev, v_prev = q0, np.zeros(6)
    for t in targets:
        for _ in range(3):
            out = f(np.array(t, dtype=float))
            assert np.all(np.isfinite(out))
            assert np.all(out >= lo) and np.all(out <= hi)
            v = (out - prev) / DT
            assert np.all(np.abs(v) <= vmax * (1 + 1e-9) + TOL)
            assert np.all(np.abs(v - v_prev) <= amax * DT * (1 + 1e-6) + 1e-7)
            prev, v_prev = out, v


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(wild, st.none(), st.text(max_size=3)), min_size=1, max_size=50))
def test_gripper_filter_output_always_inside_limits(targets):
    g = LIM.gripper
    f = GripperFilter(LIM, DT)
    prev = f.x
    for t in targets:
        out = f(t)
        assert math.isfinite(out) and g.min <= out <= g.max
        assert abs(out - prev) <= g.max_speed * DT * (1 + 1e-9)
        prev = out


def test_pose_filter_reaches_a_reachable_target_and_stops_there():
    f = PoseFilter(LIM, DT)
    start = _start_pose()
    f.reset(start)
    goal = start + np.array([0.05, -0.03, 0.02, 0, 0, 0])
    for _ in range(int(2.0 / DT)):
        out = f(goal)
    assert np.allclose(out[:3], goal[:3], atol=1e-6)
    assert np.linalg.norm(f.v) < 1e-6


def test_pose_filter_brakes_before_a_wall_and_never_crosses_it():
    f = PoseFilter(LIM, DT)
    start = _start_pose()
    f.reset(start)
    beyond = start.copy()
    beyond[2] = -1e9  # far below the floor of the box
    zs = [f(beyond)[2] for _ in range(int(3.0 / DT))]
    assert min(zs) >= LIM.workspace.min[2]
    assert zs[-1] == pytest.approx(LIM.workspace.min[2], abs=1e-3)  # it did get there


def test_nan_target_brakes_to_a_stop_and_is_counted():
    f = PoseFilter(LIM, DT)
    f.reset(_start_pose())
    for _ in range(200):
        f(_start_pose() + np.array([0.2, 0, 0, 0, 0, 0]))
    assert np.linalg.norm(f.v) > 0.05  # moving
    for _ in range(500):
        f(np.full(6, np.nan))
    assert np.linalg.norm(f.v) == 0.0
    assert f.stats.rejected == 500


def test_reset_refuses_a_pose_outside_the_box():
    f = PoseFilter(LIM, DT)
    p = _start_pose()
    p[0] = 10.0
    with pytest.raises(ValueError, match="outside the workspace box"):
        f.reset(p)


def test_joint_guard_names_the_joint():
    g = JointGuard(LIM, 0.02)
    q = np.array(CFG.home_q)
    assert g.violation(q) is None
    q[3] = LIM.joint_max[3]
    assert "joint 3" in g.violation(q)


def test_brake_speed_stops_within_the_distance():
    dt, dv = 0.002, 0.004
    for d in (0.0, 1e-6, 0.003, 0.1, 1.0):
        v = float(brake_speed(d, dt, dv))
        travelled, speed = 0.0, v
        while speed > 0:
            travelled += speed * dt
            speed = max(speed - dv, 0.0)
        assert travelled <= d + 1e-12


def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = rng.normal(size=3)
        r *= rng.uniform(0, math.pi - 1e-3) / np.linalg.norm(r)
        assert np.allclose(mat_to_rotvec(rotvec_to_mat(r)), r, atol=1e-9)
    near_pi = np.array([0.0, 0.0, math.pi - 1e-9])
    assert np.allclose(abs(mat_to_rotvec(rotvec_to_mat(near_pi))[2]), math.pi, atol=1e-6)
    assert np.allclose(rpy_to_mat(np.array([0, 0, math.pi / 2])) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


# -- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(ROBOTS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_robot_configs_load(path):
    cfg = load_robot_config(path)
    assert isinstance(cfg, RobotConfig)
    assert cfg.controller_hz in (125.0, 500.0)


def test_config_errors_name_file_key_and_allowed_values(tmp_path):
    text = (ROBOTS / "ur5e_mujoco.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("convention: ee_delta", "convention: sideways"))
    with pytest.raises(ValueError) as e:
        load_robot_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "action.convention" in msg and "'ee_delta'" in msg
    bad.write_text(text + "\nunknown_key: 1\n")
    with pytest.raises(ValueError, match="unknown_key"):
        load_robot_config(bad)
    bad.write_text(text.replace("servo: servoL", "servo: servoJ"))
    with pytest.raises(ValueError, match="needs servo: servoL"):
        load_robot_config(bad)


def test_twin_scene_errors_name_file_key_and_what_fits(tmp_path):
    text = (ROBOTS / "ur5e_mujoco_lift.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("scene: lift", "scene: kitchen"))
    with pytest.raises(ValueError) as e:
        load_robot_config(bad)
    assert str(bad) in str(e.value) and "scene" in str(e.value) and "'lift'" in str(e.value)
    bad.write_text(text.replace("scene_gripper: Robotiq140Gripper", "scene_gripper: Hand"))
    with pytest.raises(ValueError, match="scene_gripper.*Robotiq140Gripper"):
        load_robot_config(bad)
    bad.write_text(text.replace("scene: lift", "scene: static"))  # robosuite's state needs its fingers
    with pytest.raises(ValueError, match=f"{bad}.*robosuite_eef_pos_axisangle_fingers.*scene: lift"):
        load_robot_config(bad)


def test_config_by_name():
    assert load_robot_config("ur5e_mujoco").name == CFG.name


def test_rotation_vectors_whose_norm_overflows_still_give_a_rotation():
    from robot.geometry import rotvec_to_mat

    m = rotvec_to_mat(np.array([0.0, 0.0, 0.0, 0.0, 1.27e308, 1.27e308])[3:])  # found by hypothesis
    assert np.all(np.isfinite(m)) and np.allclose(m @ m.T, np.eye(3)) and np.isclose(np.linalg.det(m), 1.0)


# Every safety setting with values that would loosen or switch off its safeguard. A new field in these
# sections must be added here (test_every_safety_field_has_a_range_test).
OUT_OF_RANGE = {
    "controller_hz": [0, 5, 1000, math.inf],
    "limits.workspace.min": [[-0.6, -0.6, -math.inf], [-60.0, -0.6, 0.1], [math.nan, 0, 0]],
    "limits.workspace.max": [[-0.2, 0.2, math.inf], [-0.2, 20.0, 0.6]],
    "limits.max_linear_speed": [0, -0.1, 2.0, math.inf, math.nan],
    "limits.max_linear_accel": [0, -1, 21, math.inf],
    "limits.max_angular_speed": [0, -1, 3.2, math.inf],
    "limits.max_angular_accel": [0, -1, 61, math.inf],
    "limits.joint_min": [[-7.0, -6.0, -3.0, -6.0, -6.0, -6.0], [-math.inf, -6.0, -3.0, -6.0, -6.0, -6.0]],
    "limits.joint_max": [[7.0, 6.0, 3.0, 6.0, 6.0, 6.0], [math.nan, 6.0, 3.0, 6.0, 6.0, 6.0]],
    "limits.max_joint_speed": [
        [1e6, 1, 1, 1, 1, 1],
        [3.2, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1],
        [math.inf] * 6,
    ],
    "limits.max_joint_accel": [[1e6, 1, 1, 1, 1, 1], [41, 1, 1, 1, 1, 1], [-1, 1, 1, 1, 1, 1]],
    "limits.gripper.min": [-0.01, 0.09, math.nan],
    "limits.gripper.max": [0.2, -0.01, math.inf],
    "limits.gripper.max_speed": [0, 0.5, math.inf],
    "faults.max_action_age": [0, -1, 6, math.inf, math.nan],
    "faults.policy_liveness": [0, 3, math.inf],
    "faults.heartbeat_interval": [0, 0.6, math.inf],
    "faults.watchdog_min_hz": [0, 1, 9, math.inf],
    "faults.stop_decel": [0, 0.1, 100, math.inf],
    "faults.reconnect_interval": [0, 0.01, 100, math.inf],
    "faults.joint_margin": [-0.1, 1.0, math.inf],
    "faults.rest_linear_speed": [0, 0.1, math.inf],
    "faults.rest_angular_speed": [0, 1.0, math.inf],
    "faults.resume_timeout": [0, 0.1, 100, math.inf],
    "servo_params.lookahead_time": [0, 0.01, 0.5, math.inf],
    "servo_params.gain": [0, 50, 5000, math.inf],
    "gripper.force": [0, 19, 300, math.inf],  # N: the 2F-85's 20..235
}


def _with(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value
    return data


@pytest.mark.parametrize(("key", "values"), OUT_OF_RANGE.items(), ids=list(OUT_OF_RANGE))
def test_every_safety_field_refuses_values_out_of_its_range(key, values):
    base = load_robot_config("ur5_cb3").model_dump(mode="python")
    RobotConfig.model_validate(base)  # the base is valid: each refusal below is the one value's
    for value in values:
        with pytest.raises(ValidationError) as e:
            RobotConfig.model_validate(_with(base, key, value))
        locs = {".".join(str(x) for x in err["loc"] if not isinstance(x, int)) for err in e.value.errors()}
        assert key in locs, (key, value, e.value)


def test_every_safety_field_has_a_range_test():
    from robot.config import Faults, GripperLimits, Limits, ServoParams, Workspace

    sections = {"limits": Limits, "limits.workspace": Workspace, "limits.gripper": GripperLimits,
                "faults": Faults, "servo_params": ServoParams}  # fmt: skip
    fields = {f"{where}.{name}" for where, model in sections.items() for name in model.model_fields}
    fields -= {"limits.workspace", "limits.gripper"}
    assert fields - set(OUT_OF_RANGE) == set()


def test_inf_in_a_yaml_config_is_refused_with_the_file_and_key(tmp_path):
    text = (ROBOTS / "ur5e.yaml").read_text()
    bad = tmp_path / "robot.yaml"
    bad.write_text(text.replace("max_action_age: 0.5", "max_action_age: .inf"))
    with pytest.raises(
        ValueError, match=r"robot\.yaml: faults\.max_action_age: Input should be a finite number"
    ):
        load_robot_config(bad)
    bad.write_text(text.replace("max_linear_speed: 0.15", "max_linear_speed: 0.15\n  max_linear_speed: 2.0"))
    with pytest.raises(ValueError, match=r"robot\.yaml: key 'max_linear_speed' appears twice"):
        load_robot_config(bad)


def test_a_cb3_config_cannot_ask_for_500_hz_and_the_watchdog_not_above_the_loop():
    base = load_robot_config("ur5_cb3").model_dump(mode="python")
    with pytest.raises(ValidationError, match="at most 125 Hz"):
        RobotConfig.model_validate(_with(base, "controller_hz", 500))
    with pytest.raises(ValidationError, match="watchdog_min_hz 200 is above controller_hz 125"):
        RobotConfig.model_validate(_with(base, "faults.watchdog_min_hz", 200))


def test_quaternions_are_xyzw_as_the_sim_nodes_store_them():
    from robot.geometry import mat_to_quat

    R = rotvec_to_mat(np.array([0.0, 0.0, math.pi / 2]))
    assert np.allclose(mat_to_quat(R), [0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    assert np.allclose(mat_to_quat(np.eye(3)), [0, 0, 0, 1])
    transform_utils = pytest.importorskip("robosuite.utils.transform_utils")  # the sim nodes' source
    rng = np.random.default_rng(0)
    for r in rng.uniform(-3, 3, (20, 3)):
        ours, theirs = mat_to_quat(rotvec_to_mat(r)), transform_utils.mat2quat(rotvec_to_mat(r))
        assert np.allclose(ours, theirs, atol=1e-6) or np.allclose(ours, -theirs, atol=1e-6)
