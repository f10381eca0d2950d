"""reward/evaluate.py with a scorer whose scores are fixed by hand."""
import json

import pytest
import torch

from reward.evaluate import evaluate, write_eval
from reward.model import RewardScorer


class FixedScorer(RewardScorer):
    """Scores each response by a table, so every metric can be worked out by hand."""

    def __init__(self, table):
        self.table, self.truncated = table, 0

    def score(self, prompts, responses, batch_size=8):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def rec(chosen, rejected, rating, source, chosen_safe=None, rejected_safe=None):
    return {"prompt": [{"role": "user", "content": "q"}], "chosen": chosen, "rejected": rejected, "rating": rating,
            "category": "safety", "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "margin": None,
            "source": source}


RECORDS = [
    rec("a", "b", "significantly_better", "hh", True, False),   # gap 2 - (-1) = 3, right
    rec("c", "d", "significantly_better", "hh", True, False),   # gap 0.5 - 1 = -0.5, wrong; unsafe d scored 1 >= 0
    rec("e", "f", "better", "oasst"),                           # gap 1 - 0 = 1, right
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
