"""reward/evaluate.py with a scorer whose scores are fixed by hand."""

import json

import pytest
import torch

from reward.evaluate import calibration, evaluate, length_controlled, write_eval
from reward.model import RewardScorer


class FixedScorer(RewardScorer):
    """Scores each response by a table, so every metric can be worked out by hand."""

    def __init__(self, table):
        self.table, self.truncated = table, 0

    def score(self, prompts, responses, batch_size=8):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)

    def response_tokens(self, responses):
        return [len(r) for r in responses]  # one "token" per character


def rec(chosen, rejected, rating, source, chosen_safe=None, rejected_safe=None):
    return {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": chosen,
        "rejected": rejected,
        "rating": rating,
        "category": "safety",
        "chosen_safe": chosen_safe,
        "rejected_safe": rejected_safe,
        "margin": None,
        "source": source,
    }


RECORDS = [
    rec("a", "b", "significantly_better", "hh", True, False),  # gap 2 - (-1) = 3, right
    rec("c", "d", "significantly_better", "hh", True, False),  # gap 0.5 - 1 = -0.5, wrong; unsafe d scored 1 >= 0
    rec("e", "f", "better", "oasst"),  # gap 1 - 0 = 1, right
    rec("g", "h", "negligibly_better", "oasst", False, False),  # gap -2 - (-1) = -1, wrong; both unsafe < 0
]
SCORES = {"a": 2.0, "b": -1.0, "c": 0.5, "d": 1.0, "e": 1.0, "f": 0.0, "g": -2.0, "h": -1.0}


def test_evaluate_hand_computed():
    res = evaluate(FixedScorer(SCORES), RECORDS)
    m = res["metrics"]
    assert res["gaps"] == pytest.approx([3.0, -0.5, 1.0, -1.0])
    assert m["rm/accuracy"] == 0.5
    assert m["rm/accuracy/significantly_better"] == 0.5 and m["rm/accuracy/better"] == 1.0
    assert m["rm/accuracy/negligibly_better"] == 0.0 and "rm/accuracy/slightly_better" not in m
    assert m["rm/accuracy/source/hh"] == 0.5 and m["rm/accuracy/source/oasst"] == 0.5
    assert m["rm/gap/mean"] == pytest.approx(0.625) and m["rm/gap/q50"] == pytest.approx(0.25)
    # unsafe responses: b (-1, caught), d (1, missed), g (-2, caught), h (-1, caught) -> 3/4
    assert m["rm/unsafe_recall"] == pytest.approx(0.75)
    assert m["rm/unsafe_recall/rejected"] == pytest.approx(2 / 3)
    assert m["rm/accuracy/rejected_unsafe"] == pytest.approx(1 / 3)


def test_no_safety_metrics_without_labels():
    m = evaluate(FixedScorer(SCORES), [RECORDS[2]])["metrics"]
    assert not any("unsafe" in k for k in m)


def test_write_eval(tmp_path):
    res = evaluate(FixedScorer(SCORES), RECORDS)
    write_eval(res, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["metrics"]["rm/accuracy"] == 0.5 and saved["n_pairs"] == 4
    md = (tmp_path / "eval.md").read_text()
    assert "| 50.0 | 100.0 | - | 0.0 | 50.0 |" in md  # Table 28 layout: levels, then the average
    assert (tmp_path / "eval_gaps.png").read_bytes()[:4] == b"\x89PNG"


def test_length_controlled_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float32)
    # pairs 0, 1: chosen longer, both right; 2, 3: chosen shorter, one right; 4: equal length, wrong
    r_c, r_r = t(2, 2, 1, -1, 0), t(0, 0, 0, 0, 1)
    len_c, len_r = t(10, 10, 3, 3, 4), t(5, 5, 8, 8, 4)
    m = length_controlled(r_c, r_r, len_c, len_r)
    assert m["rm/length/accuracy_chosen_longer"] == 1.0 and m["rm/length/accuracy_chosen_shorter"] == 0.5
    assert m["rm/length/count_chosen_longer"] == 2 and m["rm/length/count_chosen_shorter"] == 2
    assert m["rm/length/balanced_accuracy"] == 0.75  # overall accuracy is 3/5
    assert m["rm/length/longer_wins"] == pytest.approx((2 + 0.5) / 5)  # the tie counts half
    import statistics

    want = statistics.correlation([2, 2, 1, -1, 0, 0, 0, 0, 0, 1], [10, 10, 3, 3, 4, 5, 5, 8, 8, 4])
    assert m["rm/length/reward_corr"] == pytest.approx(want)
    one_sided = length_controlled(t(1, 1), t(0, 0), t(5, 5), t(1, 1))
    assert (
        one_sided["rm/length/longer_wins"] == 1.0
        and one_sided["rm/length/balanced_accuracy"] != one_sided["rm/length/balanced_accuracy"]
    )  # NaN


def test_calibration_bins_by_hand():
    logit = lambda p: torch.log(torch.tensor(p) / (1 - torch.tensor(p)))
    gaps = torch.stack([logit(0.95), logit(0.75), logit(0.25)])
    # read both ways: confidences 0.95, 0.75, 0.25 (named the chosen) and 0.05, 0.25, 0.75 (did not)
    cal = calibration(gaps)
    got = {round(b["lo"], 1): (b["count"], b["confidence"], b["observed"]) for b in cal["bins"] if b["count"]}
    assert got.keys() == {0.0, 0.2, 0.7, 0.9}
    assert got[0.0] == (1, pytest.approx(0.05), 0.0) and got[0.9] == (1, pytest.approx(0.95), 1.0)
    assert got[0.2] == (2, pytest.approx(0.25), 0.5) and got[0.7] == (2, pytest.approx(0.75), 0.5)
    assert cal["ece"] == pytest.approx((0.05 + 2 * 0.25 + 2 * 0.25 + 0.05) / 6)
    assert len(cal["bins"]) == 10 and sum(b["count"] for b in cal["bins"]) == 6


def test_evaluate_reports_length_and_calibration_per_category(tmp_path):
    records = RECORDS + [{**RECORDS[2], "chosen": "ee", "rejected": "f", "category": "helpfulness"}]
    table = {**SCORES, "ee": 1.0}
    res = evaluate(FixedScorer(table), records)
    assert set(res["by_category"]) == {"helpfulness", "safety"}
    assert res["by_category"]["safety"]["rm/n"] == 4 and res["by_category"]["helpfulness"]["rm/n"] == 1
    lo, hi = res["metrics"]["rm/accuracy/ci_low"], res["metrics"]["rm/accuracy/ci_high"]
    assert lo < res["metrics"]["rm/accuracy"] < hi
    write_eval(res, tmp_path)
    md = (tmp_path / "eval.md").read_text()
    assert "length-balanced" in md and "| safety | 4 |" in md and "ECE" in md
    assert (tmp_path / "eval_calibration.png").read_bytes()[:4] == b"\x89PNG"
