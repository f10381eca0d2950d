"""Intervals and correlations for reported figures: pure functions of Python numbers (imports only math).

Every rate the project reports (an accuracy, a win rate, a refusal rate) carries its n and a 95%
interval; `wilson` is that interval for a share of n independent trials, `bootstrap_mean` the
percentile-bootstrap interval of a mean, and `paired_change` the interval of a before/after change
measured on the same items (a change whose interval holds 0 is within noise).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share ``successes / n`` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes.
    ``successes`` may be fractional (a tie counted as half). n = 0 gives (0, 1): nothing is known.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation of two equal-length sequences; NaN when either is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values but {len(y)} y values")
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def fmt_share(share: float, lo: float, hi: float, n: int) -> str:
    """``62.0% [55.1, 68.4] (n=150)``: a share with its interval and n, in percent."""
    return f"{share * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] (n={n})"


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile (0..1) of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its 95% percentile-bootstrap interval (items resampled
    with replacement, ``n_boot`` times, seeded). One value gives a zero-width interval; none is an error."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_mean: no values")
    mean = sum(values) / n
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return mean, _percentile(means, 0.025), _percentile(means, 0.975)


def paired_change(before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """The mean change ``after - before`` over the same items, its 95% bootstrap interval, n, and whether
    the interval holds 0 (``within_noise``)."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} values before but {len(after)} after")
    change, lo, hi = bootstrap_mean([a - b for a, b in zip(after, before)], n_boot, seed)
    return {"change": change, "lo": lo, "hi": hi, "n": len(before), "within_noise": lo <= 0.0 <= hi}


def fmt_change(c: dict, digits: int = 3) -> str:
    """``-0.112 [-0.150, -0.071] (n=40)``, with ``, within noise`` where the interval holds 0."""
    text = f"{c['change']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}] (n={c['n']})"
    return text + (", within noise" if c["within_noise"] else "")


def _logistic_fit(x: Sequence[float], y: Sequence[float], l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """``(a, b)`` of P(y) = sigmoid(a + b x) fitted to soft labels ``y`` in [0, 1] by Newton's method, with a
    small L2 penalty on ``b`` so that a separable sample still has an answer."""
    a = b = 0.0
    for _ in range(steps):
        ga, gb, haa, hab, hbb = 0.0, -l2 * b, 0.0, 0.0, l2
        for xi, yi in zip(x, y):
            p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, a + b * xi))))
            w = p * (1 - p)
            ga += yi - p
            gb += (yi - p) * xi
            haa += w
            hab += w * xi
            hbb += w * xi * xi
        det = haa * hbb - hab * hab
        if det <= 1e-12:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-10:
            break
    return a, b


def length_controlled_win_rate(outcomes: Sequence[float], length_diff: Sequence[float]) -> float:
    """The win rate a policy would have at equal answer length, as AlpacaEval 2.0 controls for length.

    ``outcomes`` are per-prompt results against the reference (1 win, 0.5 tie, 0 loss); ``length_diff``
    the policy's answer length minus the reference's. A logistic regression of the outcome on
    ``tanh(length_diff / std)`` is read off at a length difference of 0. A policy that wins only where
    it wrote more gets a low rate, however high its raw rate."""
    if len(outcomes) != len(length_diff):
        raise ValueError(f"length_controlled_win_rate: {len(outcomes)} outcomes but {len(length_diff)} lengths")
    if not outcomes:
        raise ValueError("length_controlled_win_rate: no outcomes")
    n = len(length_diff)
    mean = sum(length_diff) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in length_diff) / n)
    x = [math.tanh(d / std) if std > 0 else 0.0 for d in length_diff]
    a, _ = _logistic_fit(x, outcomes)
    return 1.0 / (1.0 + math.exp(-a))


def win_outcomes(scores: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-item result of ``scores`` against ``reference``: 1 win, 0.5 tie, 0 loss."""
    if len(scores) != len(reference):
        raise ValueError(f"win_outcomes: {len(scores)} scores but {len(reference)} reference scores")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference)]


def bootstrap_stat(n: int, statistic, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``statistic(indices)`` over ``n`` items resampled with replacement."""
    if n == 0:
        raise ValueError("bootstrap_stat: no items")
    rng = random.Random(seed)
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return _percentile(values, 0.025), _percentile(values, 0.975)
