"""Behaviour setpoints: a knob in physical units, held by a closed-loop controller.

An operator thinks "move at 0.10 m/s", not "clamp 16 neurons at 8.3": the strength that gives a speed differs
per model, task and moment. A behaviour axis pairs a concept's two opposite poles into one signed strength
(speed: `fast` above zero, `slow` below); a setpoint asks for a value of the behaviour; per client episode an
estimator reads the behaviour off the end-effector positions the node receives with every request, and a PI
controller sets the axis strength before each inference.

The controller works on the relative error (target - measured) / target, so one set of gains serves m/s and
metres alike; its output is bounded (`limit`) and rate-limited (`rate`), integrates only while the output is
free to move the way the error asks (anti-windup), holds while the estimator has nothing to say (the arm is
still, or nothing is being carried), and starts from zero at every episode reset.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Axis:
    """A behaviour the node can measure, and the concept poles that raise and lower it."""

    name: str
    unit: str
    raises: str  # the concept (direction name) that raises the behaviour
    lowers: str

    def strengths(self, signed: float) -> dict[str, float]:
        """The two poles' strengths for one signed axis strength (one of them zero)."""
        return {self.raises: max(signed, 0.0), self.lowers: max(-signed, 0.0)}


# What the node can estimate from end-effector positions, and the lexicons' poles that move it.
AXES = {
    "speed": Axis("speed", "m/s", raises="fast", lowers="slow"),
    "height": Axis("height", "m", raises="up", lowers="down"),
}


@dataclass
class PIController:
    """A signed strength from the relative error between a target and a measured value.

    `kp`, `ki`: strength per unit of relative error (`ki` per update); `limit`: |strength| at most;
    `rate`: the most the strength changes in one update. Anti-windup by conditional integration: the
    integral grows only while the output is not held by a bound in the direction the error pushes.
    """

    kp: float = 5.0
    ki: float = 5.0
    limit: float = 24.0
    rate: float = 4.0
    strength: float = field(default=0.0, init=False)
    integral: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        for name in ("kp", "ki", "limit", "rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PI controller: {name} must be finite and >= 0, got {value!r}")
        if self.limit == 0 or self.rate == 0:
            raise ValueError("PI controller: limit and rate must be > 0")

    def update(self, target: float, measured: float | None) -> float:
        """The strength for the next inference; `measured` None holds the current strength (frozen)."""
        if measured is None:
            return self.strength
        if not (math.isfinite(target) and target != 0 and math.isfinite(measured)):
            raise ValueError(
                f"PI controller: target {target!r} and measured {measured!r} must be finite, target != 0"
            )
        error = (target - measured) / abs(target)
        integral = self.integral + self.ki * error
        wanted = self.kp * error + integral
        low, high = max(-self.limit, self.strength - self.rate), min(self.limit, self.strength + self.rate)
        out = min(max(wanted, low), high)
        held = (wanted > high and error > 0) or (wanted < low and error < 0)
        if not held:
            self.integral = min(max(integral, -self.limit), self.limit)
        self.strength = out
        return out

    def reset(self) -> None:
        self.strength = self.integral = 0.0


@dataclass
class SpeedEstimate:
    """End-effector speed while moving (m/s): the mean over the last `window` moving steps of |dp| / dt.
    A step slower than `still` m/s says nothing (the arm is grasping, or waiting)."""

    dt: float  # seconds between two observations of one client, when they do not say when they were made
    window: int = 5
    still: float = 0.02
    _last: np.ndarray | None = field(default=None, init=False)
    _last_t: float | None = field(default=None, init=False)
    _speeds: deque = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dt) and self.dt > 0) or self.window < 1:
            raise ValueError(
                f"speed estimate: dt must be > 0 and window >= 1, got {self.dt!r}, {self.window!r}"
            )
        self._speeds = deque(maxlen=self.window)

    def update(self, ee_pos: Sequence[float], carrying: bool = True, t: float | None = None) -> float | None:
        """`t`: when `ee_pos` was measured (s); positions apart by `dt` without it."""
        if t is not None and self._last_t is not None and not t > self._last_t:
            raise ValueError(f"ee_time must increase within an episode: {t!r} after {self._last_t!r}")
        pos = np.asarray(ee_pos, dtype=np.float64)
        last, self._last = self._last, pos
        last_t, self._last_t = self._last_t, t
        if last is None:
            return None
        dt = t - last_t if t is not None and last_t is not None else self.dt
        speed = float(np.linalg.norm(pos - last)) / dt
        if speed < self.still:
            return None
        self._speeds.append(speed)
        return float(np.mean(self._speeds))


@dataclass
class HeightEstimate:
    """Carrying height (m): the end effector's height above `table_z` while it carries something; nothing
    while the gripper is open (the height of an empty hand is not what the operator set)."""

    table_z: float = 0.0
    window: int = 3
    _heights: deque = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.table_z) or self.window < 1:
            raise ValueError(f"height estimate: table_z must be finite and window >= 1, got {self.table_z!r}")
        self._heights = deque(maxlen=self.window)

    def update(self, ee_pos: Sequence[float], carrying: bool = True, t: float | None = None) -> float | None:
        if not carrying:
            self._heights.clear()
            return None
        self._heights.append(float(ee_pos[2]) - self.table_z)
        return float(np.mean(self._heights))


@dataclass
class Tracker:
    """One client episode's hold on one axis: its estimate of the behaviour and its controller.

    The node keeps one per axis with a target, per client episode (a reset starts them afresh), and calls
    `step` before each of that client's inferences: the client's own measurement if it sends one, else the
    estimate from the end-effector position it sends, else nothing (the controller holds)."""

    axis: Axis
    estimate: SpeedEstimate | HeightEstimate
    controller: PIController
    measured: float | None = None

    @classmethod
    def new(cls, axis: Axis, dt: float, controller: PIController | None = None) -> Tracker:
        estimate = SpeedEstimate(dt) if axis.name == "speed" else HeightEstimate()
        return cls(axis, estimate, controller or PIController())

    def step(
        self,
        target: float,
        ee_pos: Sequence[float] | None,
        carrying: bool | None,
        measured: float | None,
        ee_time: float | None = None,
    ) -> float:
        """The signed axis strength for the next inference (ValueError: an `ee_time` that went back)."""
        if ee_pos is not None:  # kept up to date even while the client measures for itself
            estimated = self.estimate.update(ee_pos, True if carrying is None else carrying, ee_time)
            measured = estimated if measured is None else measured
        self.measured = measured
        return self.controller.update(target, measured)
