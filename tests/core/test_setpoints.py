"""The setpoint controller and estimators on a simulated plant: step response, saturation, freezing, reset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vla_steer.core.setpoints import AXES, HeightEstimate, PIController, SpeedEstimate


class Plant:
    """A steered behaviour: speed = base * (1 + gain * strength), bounded, reached with a first-order lag
    and measured with noise (a policy whose plan flips as the strength grows behaves so on average)."""

    def __init__(self, base=0.16, gain=0.03, lag=0.5, noise=0.0, seed=0):
        self.base, self.gain, self.lag, self.noise = base, gain, lag, noise
        self.value = base
        self.rng = np.random.default_rng(seed)

    def step(self, strength: float) -> float:
        goal = self.base * min(max(1.0 + self.gain * strength, 0.4), 1.8)
        self.value += self.lag * (goal - self.value)
        return self.value * (1.0 + self.noise * self.rng.standard_normal())


def run(pi: PIController, plant: Plant, target: float, steps: int) -> tuple[list[float], list[float]]:
    measured, strengths = [], []
    m = plant.value
    for _ in range(steps):
        s = pi.update(target, m)
        strengths.append(s)
        m = plant.step(s)
        measured.append(m)
    return measured, strengths


@pytest.mark.parametrize("relative", [-0.4, 0.2, 0.5])
def test_a_step_in_the_target_settles_within_a_few_percent_with_little_overshoot(relative):
    plant, pi = Plant(noise=0.02), PIController()
    target = plant.base * (1 + relative)
    measured, strengths = run(pi, plant, target, 60)
    settled = np.median(np.abs(np.array(measured[20:]) - target)) / target
    assert settled < 0.05, settled
    overshoot = (
        max((m - target) / (target - plant.base) for m in measured[:20] if relative > 0)
        if relative > 0
        else max((target - m) / (plant.base - target) for m in measured[:20])
    )
    assert overshoot < 0.3, overshoot
    assert np.abs(np.diff([0.0, *strengths])).max() <= pi.rate + 1e-9  # rate-limited
    assert (strengths[-1] > 0) == (relative > 0)  # the sign follows the way the target asks


def test_an_unreachable_target_saturates_and_a_reachable_one_recovers_at_once():
    plant, pi = Plant(), PIController(limit=24.0)
    measured, strengths = run(pi, plant, plant.base * 2.5, 200)  # the plant tops out at 1.8x
    assert strengths[-1] == pytest.approx(24.0)
    # Anti-windup: 200 saturated steps left no integral beyond what holds the bound, so a reachable target
    # (+20%, about strength 6.7 on this plant) is tracked within a few steps; a wound-up integral (200
    # steps of a 28% error) would hold the strength at 24 for dozens.
    assert pi.integral <= pi.limit
    measured, after = run(pi, plant, plant.base * 1.2, 30)
    assert after[10] < 10.5
    assert abs(measured[-1] / (plant.base * 1.2) - 1) < 0.03


def test_a_frozen_estimate_holds_the_strength_and_reset_starts_from_zero():
    pi = PIController()
    for _ in range(5):
        pi.update(0.2, 0.1)
    held = pi.strength
    assert held > 0
    assert pi.update(0.2, None) == held and pi.update(0.2, None) == held
    pi.reset()
    assert pi.strength == 0.0 and pi.integral == 0.0
    assert pi.update(0.2, 0.2) == 0.0


def test_the_controller_refuses_values_it_cannot_act_on():
    with pytest.raises(ValueError, match="limit and rate"):
        PIController(limit=0.0)
    with pytest.raises(ValueError, match="kp"):
        PIController(kp=math.nan)
    pi = PIController()
    for target, measured in ((0.0, 0.1), (math.inf, 0.1), (0.1, math.nan)):
        with pytest.raises(ValueError, match="finite"):
            pi.update(target, measured)
    assert pi.strength == 0.0 and pi.integral == 0.0  # nothing changed


def test_speed_is_estimated_while_moving_and_says_nothing_while_still():
    est = SpeedEstimate(dt=0.1, window=3)
    assert est.update([0, 0, 0]) is None  # no previous position
    assert est.update([0.01, 0, 0]) == pytest.approx(0.1)
    assert est.update([0.03, 0, 0]) == pytest.approx(0.15)
    assert est.update([0.03, 0, 0.0001]) is None  # still: the gripper closes
    assert est.update([0.06, 0, 0]) == pytest.approx((0.1 + 0.2 + 0.3) / 3, rel=1e-4)
    with pytest.raises(ValueError, match="dt"):
        SpeedEstimate(dt=0.0)


def test_height_is_the_carrying_height_above_the_table():
    est = HeightEstimate(table_z=0.8, window=2)
    assert est.update([0, 0, 0.95], carrying=False) is None
    assert est.update([0, 0, 0.9]) == pytest.approx(0.1)
    assert est.update([0, 0, 1.0]) == pytest.approx(0.15)
    assert est.update([0, 0, 1.0], carrying=False) is None  # let go: the window restarts
    assert est.update([0, 0, 1.0]) == pytest.approx(0.2)


def test_an_axis_turns_one_signed_strength_into_its_poles():
    assert AXES["speed"].strengths(6.0) == {"fast": 6.0, "slow": 0.0}
    assert AXES["height"].strengths(-3.0) == {"up": 0.0, "down": 3.0}
