"""Seed statistics and verdicts decided by the interval."""

import math

import pytest

from jmoe.evals import difference_verdict, goal_verdict, paired_difference, summary


def test_summary_is_the_t_interval_of_the_mean():
    s = summary([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["sd"]) == (3, 2.0, 1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    one = summary([5.0])
    assert one["n"] == 1 and math.isnan(one["sd"]) and math.isnan(one["ci95"][0])
    with pytest.raises(ValueError, match="no values"):
        summary([])


def test_goal_verdicts():
    tight = summary([0.95, 0.96, 0.97])
    assert goal_verdict(tight, 0.90) == "reproduced"
    assert goal_verdict(tight, 0.99) == "not reproduced"
    assert goal_verdict(summary([0.85, 0.95, 0.99]), 0.90) == "within noise"
    assert goal_verdict(summary([0.5]), 0.1) == "not enough seeds"
    gap = summary([12.0, 12.5, 11.9])  # points below an optimum, goal <= 5
    assert goal_verdict(gap, 5.0, higher_is_better=False) == "not reproduced"
    assert goal_verdict(summary([1.0, 1.2, 0.9]), 5.0, higher_is_better=False) == "reproduced"


def test_paired_differences_and_their_verdicts():
    a, b = [1.30, 1.31, 1.29], [1.35, 1.37, 1.34]  # losses: a is lower on every seed
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(-0.0533333, abs=1e-6)
    assert difference_verdict(d, higher_is_better=False) == "reproduced"
    assert difference_verdict(d) == "not reproduced"
    assert difference_verdict(paired_difference([1.0, 2.0, 3.0], [2.0, 1.0, 3.5])) == "within noise"
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([1.0, 2.0], [1.0])
