"""Bootstrap confidence intervals: of a mean, and of a steered/baseline ratio over matched seeds.

Settings of an evaluation share their seeds (the same initial states), so a steered setting is compared
with the baseline episode of the same seed where both exist (a paired bootstrap); unmatched episodes fall
back to independent resampling of the two groups. Resampling is seeded: a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% CI
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": _num(self.mean), "ci95": [_num(self.low), _num(self.high)], "n": self.n}


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def mean_ci(values: Sequence[float], seed: int = 0) -> Estimate:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if x.size == 1:
        return Estimate(float(x[0]), math.nan, math.nan, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (RESAMPLES, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size))


def proportion_ci(successes: Sequence[bool]) -> Estimate:
    """A success rate with its 95% Wilson score interval (sound at 0% and 100%, unlike a bootstrap)."""
    k, n = sum(bool(x) for x in successes), len(successes)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def relative_change(
    steered: dict[int | str, float], baseline: dict[int | str, float], seed: int = 0
) -> Estimate:
    """mean(steered) / mean(baseline) - 1 with a 95% CI; inputs map episode seed -> metric value."""
    s = {k: v for k, v in steered.items() if v is not None and math.isfinite(v)}
    b = {k: v for k, v in baseline.items() if v is not None and math.isfinite(v)}
    if not s or not b:
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    shared = sorted(set(s) & set(b), key=str)
    if len(shared) >= 2:
        sv = np.array([s[k] for k in shared])
        bv = np.array([b[k] for k in shared])
        point = sv.mean() / bv.mean() - 1.0
        idx = rng.integers(0, len(shared), (RESAMPLES, len(shared)))
        ratios = sv[idx].mean(1) / bv[idx].mean(1) - 1.0
        n = len(shared)
    else:
        sv, bv = np.array(list(s.values())), np.array(list(b.values()))
        point = sv.mean() / bv.mean() - 1.0
        ratios = (
            sv[rng.integers(0, sv.size, (RESAMPLES, sv.size))].mean(1)
            / bv[rng.integers(0, bv.size, (RESAMPLES, bv.size))].mean(1)
            - 1.0
        )
        n = min(sv.size, bv.size)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return Estimate(float(point), float(lo), float(hi), int(n))
