"""align/stats.py: the Wilson interval and Pearson's r, against values worked out by hand."""

import math

import pytest

from align.stats import (
    bootstrap_mean,
    bootstrap_stat,
    fmt_change,
    fmt_share,
    length_controlled_win_rate,
    paired_change,
    pearson,
    wilson,
    win_outcomes,
)


def test_wilson_known_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # not empty at 0 successes
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))


def test_fmt_share():
    assert fmt_share(0.62, 0.551, 0.684, 150) == "62.0% [55.1, 68.4] (n=150)"


def test_bootstrap_mean_of_a_constant_has_no_width():
    assert bootstrap_mean([2.5] * 7) == (2.5, 2.5, 2.5)


def test_bootstrap_mean_matches_the_normal_interval_of_a_fair_share():
    # 50 zeros and 50 ones: mean 0.5, standard error sqrt(0.25 / 100) = 0.05, normal 95% interval 0.402..0.598
    mean, lo, hi = bootstrap_mean([0.0] * 50 + [1.0] * 50, n_boot=4000)
    assert mean == 0.5
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)


def test_bootstrap_mean_is_seeded_and_refuses_nothing():
    assert bootstrap_mean([1.0, 3.0, 8.0], seed=3) == bootstrap_mean([1.0, 3.0, 8.0], seed=3)
    with pytest.raises(ValueError):
        bootstrap_mean([])


def test_paired_change_outside_and_inside_noise():
    before = [1.0, 2.0, 3.0, 4.0]
    fell = paired_change(before, [b - 0.5 for b in before])
    assert (fell["change"], fell["lo"], fell["hi"], fell["n"]) == (-0.5, -0.5, -0.5, 4)
    assert not fell["within_noise"] and fmt_change(fell) == "-0.500 [-0.500, -0.500] (n=4)"
    mixed = paired_change(before, [2.0, 1.0, 4.0, 3.0])  # changes +1, -1, +1, -1: mean 0
    assert mixed["change"] == 0.0 and mixed["lo"] < 0 < mixed["hi"] and mixed["within_noise"]
    assert fmt_change(mixed).endswith(", within noise")
    with pytest.raises(ValueError):
        paired_change([1.0], [1.0, 2.0])


def test_length_controlled_win_rate_sees_through_a_policy_that_only_got_longer():
    # 100 prompts. On 50 the policy answers like the reference (same length) and wins 10 of them; on the other
    # 50 it writes 400 more characters and wins 45. Raw win rate 55%; at equal length it wins 20%.
    outcomes = [1.0] * 10 + [0.0] * 40 + [1.0] * 45 + [0.0] * 5
    diffs = [0.0] * 50 + [400.0] * 50
    raw = sum(outcomes) / len(outcomes)
    lc = length_controlled_win_rate(outcomes, diffs)
    assert raw == 0.55 and lc == pytest.approx(0.20, abs=0.01)


def test_length_controlled_win_rate_without_length_differences_is_the_raw_rate():
    outcomes = win_outcomes([3, 1, 2, 5, 2], [1, 1, 3, 4, 1])  # win, tie, loss, win, win
    assert outcomes == [1.0, 0.5, 0.0, 1.0, 1.0]
    assert length_controlled_win_rate(outcomes, [7.0] * 5) == pytest.approx(0.7, abs=1e-6)
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0], [])


def test_bootstrap_stat_interval_holds_the_statistic():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    lo, hi = bootstrap_stat(len(values), lambda idx: sum(values[i] for i in idx) / len(idx))
    assert 0.0 <= lo < 5 / 8 < hi <= 1.0
