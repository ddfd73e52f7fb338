"""Rotation helpers on plain numpy (3-vectors and 3x3 matrices): small and allocation-light for the servo loop.

Poses are 6-vectors [x, y, z, rx, ry, rz] with a rotation vector, as UR controllers and ur_rtde use them.
"""

from __future__ import annotations

import math

import numpy as np

_EYE = np.eye(3)


def skew(w: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def rotvec_to_mat(r: np.ndarray) -> np.ndarray:
    """Rodrigues' formula. Any finite vector, however long (the angle is taken modulo 2 pi)."""
    r = np.asarray(r, dtype=float)
    scale = float(np.max(np.abs(r)))
    if scale < 1e-12:
        return _EYE + skew(r)
    u = r / scale  # scaled first: the norm of a huge vector would overflow to inf
    n = math.hypot(float(u[0]), float(u[1]), float(u[2]))  # in [1, sqrt(3)]
    k = skew(u / n)
    theta = n * math.fmod(scale, 2.0 * math.pi / n)  # = |r| mod 2 pi, finite for any finite r
    return _EYE + math.sin(theta) * k + (1.0 - math.cos(theta)) * (k @ k)


def mat_to_rotvec(m: np.ndarray) -> np.ndarray:
    """Inverse of `rotvec_to_mat`, angle in [0, pi]; robust near 0 and pi."""
    cos = max(-1.0, min(1.0, (m[0, 0] + m[1, 1] + m[2, 2] - 1.0) / 2.0))
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    sin2 = float(np.linalg.norm(axis))  # 2 sin(theta)
    theta = math.atan2(sin2 / 2.0, cos)
    if theta < 1e-9:
        return axis / 2.0
    if math.pi - theta > 1e-6:
        return axis * (theta / sin2)
    # Near pi the antisymmetric part vanishes: take the axis from the symmetric part.
    b = (m + _EYE) / 2.0
    i = int(np.argmax(np.diag(b)))
    a = b[:, i] / math.sqrt(max(b[i, i], 1e-300))
    if float(a @ axis) < 0.0:  # the antisymmetric part, though small, still tells the sign
        a = -a
    return a / np.linalg.norm(a) * theta


def rpy_to_mat(rpy: np.ndarray) -> np.ndarray:
    """Roll-pitch-yaw (extrinsic x, y, z): R = Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr = math.cos(rpy[0]), math.sin(rpy[0])
    cp, sp = math.cos(rpy[1]), math.sin(rpy[1])
    cy, sy = math.cos(rpy[2]), math.sin(rpy[2])
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def mat_to_quat(m: np.ndarray) -> np.ndarray:
    """(x, y, z, w), w >= 0: the store's and the sim nodes' order (robosuite's)."""
    r = mat_to_rotvec(m)
    theta = float(np.linalg.norm(r))
    if theta < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.concatenate([r / theta * math.sin(theta / 2), [math.cos(theta / 2)]])


def quat_to_axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) -> axis * angle as robosuite's `quat2axisangle` computes it: no sign canonicalisation,
    so q and -q give different vectors (angle in [0, 2 pi]); what robosuite-trained policies were fed."""
    w = min(1.0, max(-1.0, float(quat[3])))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=float) * 2.0 * math.acos(w) / den


def rotation_angle_between(a: np.ndarray, b: np.ndarray) -> float:
    """Angle of b a^T (radians)."""
    return float(np.linalg.norm(mat_to_rotvec(b @ a.T)))
