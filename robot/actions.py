"""Policy actions -> robot waypoints, per the action convention in the robot config.

A chunk [H, A] becomes H waypoints [pose or joints (6), gripper width] spaced 1/control_hz apart. Deltas
accumulate from the robot's pose when the observation was taken. Nothing here clamps: the safety filter
in the servo loop does that for every command, whatever the waypoints say.
"""

from __future__ import annotations

import numpy as np

from robot.config import Action, GripperLimits
from robot.geometry import mat_to_rotvec, rotvec_to_mat, rpy_to_mat


def _rotation(v: np.ndarray, kind: str) -> np.ndarray:
    return rpy_to_mat(v) if kind == "rpy" else rotvec_to_mat(v)


def gripper_width(value: float, convention: str, limits: GripperLimits) -> float:
    lo, hi = limits.min, limits.max
    if convention == "open_positive":  # -1 closed .. +1 open
        return lo + (float(value) + 1.0) / 2.0 * (hi - lo)
    if convention == "close_positive":  # 0 open .. 1 closed
        return hi - float(value) * (hi - lo)
    return float(value)


def chunk_to_waypoints(
    actions: np.ndarray,
    action: Action,
    gripper_limits: GripperLimits,
    *,
    pose: np.ndarray,
    q: np.ndarray,
    gripper: float,
    t_start: float,
    control_hz: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(times [n], waypoints [n, 7]) for the first `action.execute` steps of the chunk (all by default)."""
    actions = np.asarray(actions, dtype=float)
    if actions.ndim != 2:
        raise ValueError(f"an action chunk is [steps, action_dim], got shape {actions.shape}")
    need = 6 if action.joints or action.rotation != "none" else 3
    if action.gripper.index is not None:
        need = max(need, action.gripper.index + 1)
    if actions.shape[1] < need:
        raise ValueError(
            f"action convention {action.convention!r} (rotation {action.rotation!r}, gripper index "
            f"{action.gripper.index}) needs {need} action dims; the policy sends {actions.shape[1]}"
        )
    n = min(len(actions), action.execute or len(actions))
    out = np.empty((n, 7))
    p = np.asarray(pose[:3], dtype=float).copy()
    R = rotvec_to_mat(pose[3:6])
    joints = np.asarray(q, dtype=float).copy()
    width = gripper
    ts, rs = action.translation_scale, action.rotation_scale
    for k in range(n):
        a = actions[k]
        if action.convention == "ee_delta":
            d = a[:3] * ts
            p = p + (R @ d if action.frame == "tool" else d)
            if action.rotation != "none":
                dR = _rotation(a[3:6] * rs, action.rotation)
                R = R @ dR if action.frame == "tool" else dR @ R
            out[k, :6] = np.concatenate([p, mat_to_rotvec(R)])
        elif action.convention == "ee_absolute":
            p = a[:3] * ts
            if action.rotation != "none":
                R = _rotation(a[3:6] * rs, action.rotation)
            out[k, :6] = np.concatenate([p, mat_to_rotvec(R)])
        elif action.convention == "joint_absolute":
            out[k, :6] = a[:6] * rs
        else:  # joint_delta
            joints = joints + a[:6] * rs
            out[k, :6] = joints
        if action.gripper.index is not None:
            width = gripper_width(a[action.gripper.index], action.gripper.convention, gripper_limits)
        out[k, 6] = width
    times = t_start + np.arange(1, n + 1) / control_hz
    return times, out
