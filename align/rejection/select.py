"""Selection, pooling across rounds and the best-of-N curve of rejection sampling (pure Python).

Llama 2 (Touvron et al., 2023), sec. 3.2.3: for each prompt, sample K answers, score them with the
reward model, keep the best; from RLHF-V4 on, the kept set draws on the best samples of ALL earlier
iterations, not only the last. Figure 7 plots the max and the median reward among N samples against N:
the gap between the two is what rejection sampling can gain.

A sample is a dict with at least ``prompt_id`` (int), ``round`` (int, 1-based), ``sample`` (its index
among the round's K samples of that prompt) and ``score`` (the selection score: the combined reward
before whitening, LOGIT(Rc); see align/rejection/score.py). Other keys are carried along untouched.
"""

from __future__ import annotations

import math
import statistics
from math import comb
from typing import Iterable, Sequence


def _rank(sample: dict) -> tuple:
    # Highest score first; ties go to the earlier round, then to the lower sample index, so the
    # selection is deterministic and a later round never displaces an equal earlier answer.
    return (-float(sample["score"]), int(sample["round"]), int(sample["sample"]))


def best_per_prompt(samples: Iterable[dict]) -> list[dict]:
    """The best sample of each prompt (highest ``score``; ties: earlier round, lower sample index),
    sorted by ``prompt_id``. NaN scores are an error: a NaN would silently never (or always) win."""
    best: dict[int, dict] = {}
    for s in samples:
        if math.isnan(float(s["score"])):
            raise ValueError(f"prompt {s['prompt_id']}, round {s['round']}, sample {s['sample']}: score is NaN")
        pid = int(s["prompt_id"])
        if pid not in best or _rank(s) < _rank(best[pid]):
            best[pid] = s
    return [best[pid] for pid in sorted(best)]


def pool_round(kept_before: Sequence[dict], samples: Sequence[dict]) -> list[dict]:
    """The kept set of a round: per prompt, the best among the answers kept by all earlier rounds
    (``kept_before``, one per prompt) and this round's samples (K per prompt).

    Since ``kept_before`` is itself the best of every earlier round, this is the best over all rounds
    so far (recipe: from RLHF-V4 on). A prompt sampled in no round is absent; one sampled only earlier
    keeps its earlier answer.
    """
    return best_per_prompt([*kept_before, *samples])


def expected_order_statistic(scores: Sequence[float], n: int, j: int) -> float:
    """E[the j-th smallest of n values drawn without replacement from ``scores``] (1 <= j <= n <= K).

    With x_1 <= ... <= x_K sorted, x_i is the j-th smallest of a uniformly random n-subset with
    probability C(i-1, j-1) C(K-i, n-j) / C(K, n), so the expectation is exact and unbiased: the
    average over all C(K, n) subsets, without drawing any. For j = n it is the estimator of
    E[max of n] used for pass@k-style curves (Chen et al., 2021).
    """
    k = len(scores)
    if not 1 <= j <= n <= k:
        raise ValueError(f"need 1 <= j <= n <= K; got j={j}, n={n}, K={k}")
    xs = sorted(float(x) for x in scores)
    total = comb(k, n)
    return sum(x * comb(i, j - 1) * comb(k - 1 - i, n - j) for i, x in enumerate(xs)) / total


def expected_max(scores: Sequence[float], n: int) -> float:
    """E[max of n of the K scores], drawn without replacement (see `expected_order_statistic`)."""
    return expected_order_statistic(scores, n, n)


def expected_median(scores: Sequence[float], n: int) -> float:
    """E[median of n of the K scores]; for even n the median is the mean of the two middle values."""
    if n % 2:
        return expected_order_statistic(scores, n, (n + 1) // 2)
    return 0.5 * (expected_order_statistic(scores, n, n // 2) + expected_order_statistic(scores, n, n // 2 + 1))


def best_of_n_curve(groups: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """The recipe's figure 7 from K samples per prompt: for N = 1..K, the max and the median reward
    among N samples, each the exact expectation over N-subsets of a prompt's K samples, averaged over
    prompts.

    Args:
        groups: one sequence of K scores per prompt (the same K for all).

    Returns:
        ``{"n": [1..K], "max": [...], "median": [...]}``; at N = 1 both equal the mean score, at N = K
        ``max`` is the mean over prompts of the best score.
    """
    if not groups:
        raise ValueError("best_of_n_curve needs at least one prompt's scores")
    k = len(groups[0])
    if k == 0 or any(len(g) != k for g in groups):
        raise ValueError(f"every prompt needs the same number (>= 1) of scores; got {sorted({len(g) for g in groups})}")
    ns = list(range(1, k + 1))
    return {
        "n": ns,
        "max": [statistics.fmean(expected_max(g, n) for g in groups) for n in ns],
        "median": [statistics.fmean(expected_median(g, n) for g in groups) for n in ns],
    }


def scores_by_prompt(samples: Iterable[dict]) -> list[list[float]]:
    """The samples' scores grouped by prompt (prompts in ``prompt_id`` order, samples by index)."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for s in samples:
        groups.setdefault(int(s["prompt_id"]), []).append((int(s["sample"]), float(s["score"])))
    return [[score for _, score in sorted(groups[pid])] for pid in sorted(groups)]
