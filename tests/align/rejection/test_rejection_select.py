"""Selection, pooling across rounds and the best-of-N curve, on hand-made records and hand numbers."""

import itertools
import statistics

import pytest

from align.rejection.select import (
    best_of_n_curve,
    best_per_prompt,
    expected_max,
    expected_median,
    pool_round,
    scores_by_prompt,
)


def s(pid, rnd, idx, score, text=""):
    return {"prompt_id": pid, "round": rnd, "sample": idx, "score": score, "response": text or f"p{pid}r{rnd}s{idx}"}


def test_best_per_prompt_keeps_the_highest_score_of_each_prompt():
    samples = [s(0, 1, 0, 0.1), s(0, 1, 1, 0.9), s(0, 1, 2, -2.0), s(1, 1, 0, -0.5), s(1, 1, 1, -0.4)]
    kept = best_per_prompt(samples)
    assert [(k["prompt_id"], k["sample"]) for k in kept] == [(0, 1), (1, 1)]


def test_ties_go_to_the_earlier_round_then_the_lower_sample():
    kept = best_per_prompt([s(0, 2, 0, 1.0), s(0, 1, 3, 1.0), s(0, 1, 2, 1.0)])
    assert (kept[0]["round"], kept[0]["sample"]) == (1, 2)


def test_nan_score_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        best_per_prompt([s(0, 1, 0, float("nan"))])


def test_two_rounds_the_pool_keeps_a_round1_answer_over_worse_round2_answers():
    round1 = [s(0, 1, 0, 2.0, "good old answer"), s(0, 1, 1, 0.5), s(1, 1, 0, -1.0), s(1, 1, 1, -3.0)]
    kept1 = pool_round([], round1)
    assert [k["response"] for k in kept1] == ["good old answer", "p1r1s0"]
    round2 = [
        s(0, 2, 0, 1.5),
        s(0, 2, 1, 1.9),  # both worse than round 1's 2.0
        s(1, 2, 0, 0.7),
        s(1, 2, 1, -2.0),
    ]  # better than round 1's -1.0
    kept2 = pool_round(kept1, round2)
    assert [(k["prompt_id"], k["round"], k["score"]) for k in kept2] == [(0, 1, 2.0), (1, 2, 0.7)]
    assert kept2[0]["response"] == "good old answer"
    # Pooling only the last round (what the recipe found regressed) would have lost it.
    assert best_per_prompt(round2)[0]["score"] == 1.9


def test_a_prompt_sampled_only_in_an_earlier_round_keeps_its_answer():
    kept = pool_round([s(5, 1, 0, 0.3)], [s(6, 2, 0, 0.1)])
    assert [(k["prompt_id"], k["round"]) for k in kept] == [(5, 1), (6, 2)]


def test_expected_max_and_median_by_hand():
    xs = [3.0, 1.0, 4.0, 2.0]
    # N=2: the 6 pairs have maxima 2,3,4,3,4,4 -> 20/6; their medians are the pair means -> 2.5.
    assert expected_max(xs, 2) == pytest.approx(20 / 6)
    assert expected_median(xs, 2) == pytest.approx(2.5)
    # N=3: triples {1,2,3},{1,2,4},{1,3,4},{2,3,4}: maxima 3,4,4,4 -> 3.75; medians 2,2,3,3 -> 2.5.
    assert expected_max(xs, 3) == pytest.approx(3.75)
    assert expected_median(xs, 3) == pytest.approx(2.5)
    assert expected_max(xs, 1) == pytest.approx(2.5) == expected_median(xs, 1)
    assert expected_max(xs, 4) == 4.0 and expected_median(xs, 4) == pytest.approx(2.5)


def test_expected_max_equals_brute_force_over_subsets():
    xs = [0.3, -1.2, 2.5, 0.3, 1.1, -0.4]
    for n in range(1, len(xs) + 1):
        subsets = list(itertools.combinations(xs, n))
        assert expected_max(xs, n) == pytest.approx(statistics.fmean(max(c) for c in subsets))
        assert expected_median(xs, n) == pytest.approx(statistics.fmean(statistics.median(c) for c in subsets))


def test_best_of_n_curve_averages_prompts_and_rises_with_n():
    curve = best_of_n_curve([[3.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 4.0]])
    assert curve["n"] == [1, 2, 3, 4]
    # prompt 2: E[max of N] = P(the 4 is drawn) * 4 = N/4 * 4 = N.
    assert curve["max"] == pytest.approx([(2.5 + 1) / 2, (20 / 6 + 2) / 2, (3.75 + 3) / 2, (4 + 4) / 2])
    assert curve["median"][0] == pytest.approx(curve["max"][0])
    assert all(a <= b for a, b in zip(curve["max"], curve["max"][1:]))


def test_best_of_n_curve_needs_equal_k():
    with pytest.raises(ValueError, match="same number"):
        best_of_n_curve([[1.0, 2.0], [1.0]])


def test_scores_by_prompt_orders_prompts_and_samples():
    got = scores_by_prompt([s(1, 1, 1, 5.0), s(0, 1, 0, 1.0), s(1, 1, 0, 4.0), s(0, 1, 1, 2.0)])
    assert got == [[1.0, 2.0], [4.0, 5.0]]
