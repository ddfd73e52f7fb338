"""The safety filter every servo command passes, whatever the policy sent.

Guarantees, for any sequence of inputs (NaN, inf and huge values included), on consecutive outputs
spaced `dt` apart, starting from a state at rest inside the limits:

- tool position inside the workspace box; joint positions inside the joint limits;
- linear and angular speed at most their maxima; change of velocity per step at most `max_accel * dt`
  (for translation: the Euclidean norm; for joints: per joint);
- gripper inside its range and rate-limited;
- every output finite. A non-finite target is rejected (counted) and treated as "stay here": the filter
  brakes to a stop within its acceleration limit instead of jumping.

How the box and the acceleration limit are both kept: a velocity toward a wall is capped by the speed from
which the arm can still stop, discretely, before reaching it, using `accel / sqrt(3)` per axis (a braking
velocity `v_b` that lowers each axis by that much is then always allowed and within the norm limit). The
filter moves from `v_b` toward the desired velocity as far as the acceleration limit allows; both ends
satisfy the speed limit and the wall caps, and those sets are convex, so the result does too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from robot.config import Limits
from robot.geometry import mat_to_rotvec, rotvec_to_mat

_SQRT3 = math.sqrt(3.0)


def brake_speed(distance: np.ndarray | float, dt: float, dv: np.ndarray | float) -> np.ndarray:
    """The largest speed v such that moving at v for one step, then losing `dv` per step until stopped,
    covers at most `distance`: v*dt + dt*sum_{j>=1} max(v - j*dv, 0) <= distance. Elementwise, >= 0."""
    d = np.maximum(np.asarray(distance, dtype=float), 0.0)
    unit = dt * dv
    # n: how many further steps of braking fit, from d >= unit * n (n + 1) / 2
    n = np.floor((-1.0 + np.sqrt(1.0 + 8.0 * d / unit)) / 2.0)
    v = (d / dt + dv * n * (n + 1.0) / 2.0) / (n + 1.0)
    return np.maximum(v * (1.0 - 1e-12) - 1e-15, 0.0)  # round down: never a hair past the wall


def _clip_norm(v: np.ndarray, limit: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v * (limit / n) if n > limit else v


@dataclass
class FilterStats:
    rejected: int = 0  # non-finite targets turned into "stop here"
    limited: int = 0  # steps where a limit changed the command


class PoseFilter:
    """Cartesian targets [x y z rx ry rz] (rotation vector) -> safe servoL targets."""

    def __init__(self, limits: Limits, dt: float):
        self.lo = np.array(limits.workspace.min, dtype=float)
        self.hi = np.array(limits.workspace.max, dtype=float)
        self.v_max = limits.max_linear_speed
        self.a_max = limits.max_linear_accel
        self.w_max = limits.max_angular_speed
        self.alpha_max = limits.max_angular_accel
        self.dt = dt
        self.stats = FilterStats()
        self.p = np.zeros(3)
        self.v = np.zeros(3)
        self.R = np.eye(3)
        self.w = np.zeros(3)

    def reset(self, pose: np.ndarray) -> None:
        """Start at rest at `pose` (the robot's actual pose). Refuses a pose outside the box."""
        pose = np.asarray(pose, dtype=float)
        if pose.shape != (6,) or not np.all(np.isfinite(pose)):
            raise ValueError(f"pose must be 6 finite numbers, got {pose!r}")
        if np.any(pose[:3] < self.lo) or np.any(pose[:3] > self.hi):
            raise ValueError(
                f"the tool is at {np.round(pose[:3], 4).tolist()}, outside the workspace box "
                f"{self.lo.tolist()} .. {self.hi.tolist()}; move it inside before servoing"
            )
        self.p, self.v = pose[:3].copy(), np.zeros(3)
        self.R, self.w = rotvec_to_mat(pose[3:]), np.zeros(3)

    @property
    def pose(self) -> np.ndarray:
        return np.concatenate([self.p, mat_to_rotvec(self.R)])

    def __call__(self, target: np.ndarray) -> np.ndarray:
        target = np.asarray(target, dtype=float)
        ok = target.shape == (6,) and bool(np.all(np.isfinite(target)))
        if not ok:
            self.stats.rejected += 1
        p_t = np.clip(target[:3], self.lo, self.hi) if ok else self.p
        R_t = rotvec_to_mat(target[3:]) if ok else self.R
        limited = self._translate(p_t) | self._rotate(R_t)
        self.stats.limited += int(limited or not ok)
        return self.pose

    def _translate(self, p_t: np.ndarray) -> bool:
        dt, p, v = self.dt, self.p, self.v
        dv_axis = self.a_max * dt / _SQRT3
        e = p_t - p
        want = e / dt
        v_t = _clip_norm(want, min(self.v_max, float(brake_speed(np.linalg.norm(e), dt, self.a_max * dt))))
        v_t = np.clip(v_t, -brake_speed(p - self.lo, dt, dv_axis), brake_speed(self.hi - p, dt, dv_axis))
        v_b = np.sign(v) * np.maximum(np.abs(v) - dv_axis, 0.0)
        # Largest lam in [0, 1] with |v_b + lam (v_t - v_b) - v| <= a dt
        u, w, r = v_b - v, v_t - v_b, self.a_max * dt
        ww, uw, uu = float(w @ w), float(u @ w), float(u @ u)
        if ww <= 0.0:
            lam = 1.0
        else:
            disc = max(uw * uw - ww * (uu - r * r), 0.0)
            lam = min(1.0, max(0.0, (-uw + math.sqrt(disc)) / ww))
        v_new = v_b + lam * w
        self.p = np.clip(p + v_new * dt, self.lo, self.hi)
        self.v = (self.p - p) / dt
        return bool(np.abs(v_new - want).max() > 1e-9)

    def _rotate(self, R_t: np.ndarray) -> bool:
        dt = self.dt
        err = mat_to_rotvec(R_t @ self.R.T)  # world-frame rotation still to go
        angle = float(np.linalg.norm(err))
        want = err / dt
        w_t = _clip_norm(want, min(self.w_max, float(brake_speed(angle, dt, self.alpha_max * dt))))
        w_new = self.w + _clip_norm(w_t - self.w, self.alpha_max * dt)
        self.R = rotvec_to_mat(w_new * dt) @ self.R
        self.w = w_new
        return bool(np.abs(w_new - want).max() > 1e-9)


class JointFilter:
    """Joint targets -> safe servoJ targets, each joint on its own (limits, speed, acceleration)."""

    def __init__(self, limits: Limits, dt: float):
        self.lo = np.array(limits.joint_min, dtype=float)
        self.hi = np.array(limits.joint_max, dtype=float)
        self.v_max = np.array(limits.max_joint_speed, dtype=float)
        self.a_max = np.array(limits.max_joint_accel, dtype=float)
        self.dt = dt
        self.stats = FilterStats()
        self.q = np.zeros(len(self.lo))
        self.v = np.zeros(len(self.lo))

    def reset(self, q: np.ndarray) -> None:
        q = np.asarray(q, dtype=float)
        if q.shape != self.lo.shape or not np.all(np.isfinite(q)):
            raise ValueError(f"joints must be {len(self.lo)} finite numbers, got {q!r}")
        bad = np.flatnonzero((q < self.lo) | (q > self.hi))
        if bad.size:
            raise ValueError(f"joints {bad.tolist()} are outside their limits at {np.round(q, 4).tolist()}")
        self.q, self.v = q.copy(), np.zeros_like(q)

    def __call__(self, target: np.ndarray) -> np.ndarray:
        target = np.asarray(target, dtype=float)
        ok = target.shape == self.q.shape and bool(np.all(np.isfinite(target)))
        if not ok:
            self.stats.rejected += 1
        dt, q, v = self.dt, self.q, self.v
        dv = self.a_max * dt
        q_t = np.clip(target, self.lo, self.hi) if ok else q
        e = q_t - q
        want = e / dt
        cap = np.minimum(self.v_max, brake_speed(np.abs(e), dt, dv))
        v_t = np.clip(want, -cap, cap)
        lower = np.maximum.reduce([v - dv, -brake_speed(q - self.lo, dt, dv), -self.v_max])
        upper = np.minimum.reduce([v + dv, brake_speed(self.hi - q, dt, dv), self.v_max])
        upper = np.maximum(upper, lower)  # numerically equal ends only; the interval is never empty
        v_new = np.clip(v_t, lower, upper)
        self.q = np.clip(q + v_new * dt, self.lo, self.hi)
        self.v = (self.q - q) / dt
        self.stats.limited += int(not ok or bool(np.abs(v_new - want).max() > 1e-9))
        return self.q.copy()


class GripperFilter:
    """Opening width in metres: inside [min, max], at most `max_speed`."""

    def __init__(self, limits: Limits, dt: float):
        g = limits.gripper
        self.lo, self.hi, self.step = g.min, g.max, g.max_speed * dt
        self.x = g.max
        self.stats = FilterStats()

    def reset(self, width: float) -> None:
        self.x = float(np.clip(width, self.lo, self.hi)) if math.isfinite(width) else self.hi

    def __call__(self, target: float) -> float:
        try:
            t = float(target)
        except (TypeError, ValueError):
            t = math.nan
        if not math.isfinite(t):
            self.stats.rejected += 1
            t = self.x
        t = min(max(t, self.lo), self.hi)
        self.x = min(max(self.x + min(max(t - self.x, -self.step), self.step), self.lo), self.hi)
        return self.x


class JointGuard:
    """For servoL, where the controller solves IK: the actual joints must stay `margin` inside the limits."""

    def __init__(self, limits: Limits, margin: float):
        self.lo = np.array(limits.joint_min) + margin
        self.hi = np.array(limits.joint_max) - margin

    def violation(self, q: np.ndarray) -> str | None:
        bad = np.flatnonzero(~((q >= self.lo) & (q <= self.hi)))
        if bad.size == 0:
            return None
        i = int(bad[0])
        return f"joint {i} at {float(q[i]):.4f} rad is outside [{self.lo[i]:.4f}, {self.hi[i]:.4f}]"
