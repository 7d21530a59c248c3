"""Statistics for claims measured over seeds: mean, spread, 95% intervals, verdicts.

A claim is judged by its interval, never by hand:

  against a goal     `goal_verdict(summary(values), goal)`: "reproduced" when the whole
                     95% interval of the mean clears the goal, "not reproduced" when the
                     whole interval misses it, "within noise" otherwise;
  between methods    `difference_verdict(paired_difference(a, b))`, for a claim that a beats
                     b (per-seed values paired by seed): "reproduced" when the interval of
                     the mean difference is above 0, "not reproduced" when it is below 0,
                     "within noise" when it holds 0.

Lower-is-better metrics (a loss, bits per byte) pass `higher_is_better=False`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VERDICTS = ("reproduced", "not reproduced", "within noise", "not enough seeds")


def summary(values: Sequence[float]) -> dict:
    """{"n", "mean", "sd", "ci95": [low, high], "values"}: the 95% t-interval of the mean
    (sd and the interval are NaN for a single value)."""
    from scipy import stats

    v = np.asarray(values, float).reshape(-1)
    if v.size == 0:
        raise ValueError("summary of no values")
    n, mean = v.size, float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "values": v.tolist()}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """`summary` of a - b, seed by seed (ValueError when the lengths differ)."""
    a, b = np.asarray(a, float).reshape(-1), np.asarray(b, float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one per seed on both sides, got {a.size} and {b.size}")
    return summary(a - b)


def goal_verdict(s: dict, goal: float, *, higher_is_better: bool = True) -> str:
    """The verdict of a `summary` against a goal (see the module docstring)."""
    lo, hi = s["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not enough seeds"
    if not higher_is_better:
        lo, hi, goal = -hi, -lo, -goal
    return "reproduced" if lo >= goal else "not reproduced" if hi < goal else "within noise"


def difference_verdict(diff: dict, *, higher_is_better: bool = True) -> str:
    """The verdict of a `paired_difference` (a - b) for the claim "a beats b"."""
    return goal_verdict(diff, 0.0, higher_is_better=higher_is_better) if not _touches_zero(diff) else "within noise"


def _touches_zero(diff: dict) -> bool:
    lo, hi = diff["ci95"]
    return math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi
