"""Agreement figures (align/label/agreement.py) against hand-computed values."""

from __future__ import annotations

import pytest

from align.label.agreement import (
    agreement_metrics,
    cohen_kappa,
    fleiss_kappa,
    format_agreement,
    label_gaps,
    majority,
    round_agreement,
)


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as worked on Wikipedia's "Fleiss' kappa": 10 items, 14 raters, 5 categories.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    # By hand: P_bar = 0.378, P_e = 0.213, kappa = (0.378 - 0.213) / (1 - 0.213) = 0.210.
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_small_hand_example():
    # 3 items, 2 raters, categories (a, b): [2,0], [0,2], [1,1].
    # P_i = 1, 1, 0 -> P_bar = 2/3; p = (3/6, 3/6) -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3.
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1]]) == pytest.approx(1 / 3)
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert fleiss_kappa([[2, 0], [2, 0]]) is None  # one category only: chance agreement is 1
    assert fleiss_kappa([]) is None
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 0]])  # items with different numbers of ratings


def test_cohen_kappa_textbook_example():
    # Wikipedia's "Cohen's kappa": 50 items; yes/yes 20, A yes B no 5, A no B yes 10, no/no 15.
    # p_o = 35/50 = 0.7; A says yes 25/50, B 30/50: p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = 0.4.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None


def test_majority_and_gaps():
    assert majority(["a", "a", "b"]) == "a" and majority(["a", "b"]) is None and majority([]) is None
    times = [
        "2024-01-01T10:00:00+00:00",
        "2024-01-01T10:00:10+00:00",
        "2024-01-01T10:00:40+00:00",
        "2024-01-01T11:00:00+00:00",
    ]  # the last gap (an hour) is a break
    assert label_gaps(times) == [10.0, 30.0]


def _lab(name, choice, t, rating=None):
    return {"labeler": name, "choice": choice, "rating": rating, "created_at": f"2024-01-01T10:{t:02d}:00+00:00"}


def test_round_agreement_two_labelers_by_hand():
    # ann / bob over 4 pairs: (a, a), (b, b), (a, b), (tie, skip).
    pairs = [
        {"id": 1, "labels": [_lab("ann", "a", 0), _lab("bob", "a", 0)]},
        {"id": 2, "labels": [_lab("ann", "b", 1), _lab("bob", "b", 2)]},
        {"id": 3, "labels": [_lab("ann", "a", 2), _lab("bob", "b", 4)]},
        {"id": 4, "labels": [_lab("ann", "tie", 3), _lab("bob", "skip", 6)]},
    ]
    got = round_agreement(pairs, labels_per_pair=2)
    # Cohen over pairs 1-3: p_o = 2/3; ann (a, b, a), bob (a, b, b): p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9;
    # kappa = (2/3 - 4/9) / (5/9) = 0.4. Fleiss over the same 3 pairs: P_bar 2/3, p = (3/6, 3/6), 1/3.
    assert got["cohen_kappa"] == pytest.approx(0.4)
    assert got["fleiss_kappa"] == pytest.approx(1 / 3)
    assert got["kappa_pairs"] == 3
    assert got["labels"] == 8 and got["tie_share"] == pytest.approx(1 / 8) and got["skip_share"] == pytest.approx(1 / 8)
    # Each labeler compared on 3 pairs (the other's vote is the majority), agrees on 2.
    assert got["labelers"]["ann"]["majority_agreement"] == pytest.approx(2 / 3)
    assert got["labelers"]["bob"] == {
        "labels": 3,
        "skips": 1,
        "compared": 3,
        "majority_agreement": pytest.approx(2 / 3),
        "gold_labels": 0,
        "gold_accuracy": None,
        "seconds_per_label": 120.0,
    }
    assert got["labelers"]["ann"]["seconds_per_label"] == 60.0
    metrics = agreement_metrics(got)
    assert metrics["label/quality/cohen_kappa"] == pytest.approx(0.4)
    assert metrics["label/quality/labeler/bob/skips"] == 1
    lines = format_agreement(got)
    assert "Cohen's kappa 0.40 (3 pairs)" in lines[0] and lines[1].startswith("    ann: 4 labels, 0 skips")


def test_round_agreement_three_labelers_leave_one_out():
    # Three labelers on one pair: a, a, b. For ann (and bob) the others voted (a, b): no majority, so
    # not compared; for cy the others voted (a, a): compared, and cy disagrees.
    pairs = [{"id": 1, "labels": [_lab("ann", "a", 0), _lab("bob", "a", 1), _lab("cy", "b", 2)]}]
    got = round_agreement(pairs, labels_per_pair=3)
    assert got["cohen_kappa"] is None
    assert got["labelers"]["cy"] == {
        "labels": 1,
        "skips": 0,
        "compared": 1,
        "majority_agreement": 0.0,
        "gold_labels": 0,
        "gold_accuracy": None,
        "seconds_per_label": None,
    }
    assert got["labelers"]["ann"]["compared"] == 0 and got["labelers"]["ann"]["majority_agreement"] is None
    # Fleiss on one item [2, 1, 0]: P_1 = (4 + 1 - 3) / 6 = 1/3; p = (2/3, 1/3, 0), P_e = 5/9;
    # kappa = (1/3 - 5/9) / (4/9) = -0.5.
    assert got["fleiss_kappa"] == pytest.approx(-0.5)


def test_gold_accuracy_by_hand_and_gold_left_out_of_agreement():
    # Two regular pairs both agree on; three gold pairs (answers a, b, a).
    # ann on gold: a (right), b (right), tie (wrong) -> 2/3. bob: b (wrong), skip (no vote), a (right) -> 1/2.
    pairs = [
        {"id": 1, "gold": None, "labels": [_lab("ann", "a", 0), _lab("bob", "a", 0)]},
        {"id": 2, "gold": "a", "labels": [_lab("ann", "a", 1), _lab("bob", "b", 1)]},
        {"id": 3, "gold": None, "labels": [_lab("ann", "b", 2), _lab("bob", "b", 2)]},
        {"id": 4, "gold": "b", "labels": [_lab("ann", "b", 3), _lab("bob", "skip", 3)]},
        {"id": 5, "gold": "a", "labels": [_lab("ann", "tie", 4), _lab("bob", "a", 4)]},
    ]
    got = round_agreement(pairs, labels_per_pair=2)
    assert got["labelers"]["ann"]["gold_accuracy"] == pytest.approx(2 / 3)
    assert got["labelers"]["ann"]["gold_labels"] == 3
    assert got["labelers"]["bob"]["gold_accuracy"] == pytest.approx(1 / 2)
    assert got["labelers"]["bob"]["gold_labels"] == 2
    assert (got["gold_pairs"], got["gold_labels"], got["gold_accuracy"]) == (3, 5, pytest.approx(3 / 5))
    # Agreement and kappa see the two regular pairs only: full agreement, kappa 1 (a, b vs a, b).
    assert got["majority_agreement"] == 1.0 and got["cohen_kappa"] == pytest.approx(1.0)
    assert got["labels"] == 4 and got["skip_share"] == 0.0 and got["tie_share"] == 0.0
    assert got["labelers"]["bob"]["skips"] == 0  # the skip was on a gold pair
    # Time per label counts every label, gold ones too: one a minute.
    assert got["labelers"]["ann"]["seconds_per_label"] == 60.0
    metrics = agreement_metrics(got)
    assert metrics["label/quality/gold_accuracy"] == pytest.approx(3 / 5)
    assert metrics["label/quality/labeler/bob/gold_accuracy"] == pytest.approx(1 / 2)
    lines = format_agreement(got)
    assert lines[0].endswith("gold accuracy 60% of 5")
    assert "gold accuracy 67% of 3" in lines[1]
