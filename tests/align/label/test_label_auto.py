"""The automatic labeler: its decisions by hand, and labeling through the HTTP API (in process and
against a live server) with the rules judge and with real (tiny) reward models."""

from __future__ import annotations

import math
import random

import pytest

from align.label.auto import RewardJudge, RuleJudge, auto_labelers, decide, label_round, make_judge, rule_points
from align.label.config import AutoLabelConfig
from align.label.export import ExportPolicy, resolve_round

CFG = AutoLabelConfig(rating_gaps=(1.0, 0.5, 0.2))


def test_decide_by_hand():
    assert decide(2.0, 0.8, True, False, CFG) == {
        "choice": "a",
        "rating": "significantly_better",
        "a_safe": True,
        "b_safe": False,
    }
    assert (
        decide(0.0, 0.6, True, True, CFG)["choice"] == "b" and decide(0.0, 0.6, True, True, CFG)["rating"] == "better"
    )
    assert decide(0.3, 0.0, True, True, CFG)["rating"] == "slightly_better"
    assert decide(0.1, 0.0, True, True, CFG)["rating"] == "negligibly_better"
    assert decide(0.0, 0.0, True, True, CFG)["choice"] == "a"  # tie_below 0: never a tie
    tie_cfg = AutoLabelConfig(tie_below=0.5)
    assert decide(0.3, 0.0, True, False, tie_cfg) == {"choice": "tie", "rating": None, "a_safe": True, "b_safe": False}
    flip = AutoLabelConfig(flip_prob=0.5)
    choices = [decide(1.0, 0.0, True, True, flip, random.Random(i))["choice"] for i in range(200)]
    assert 60 < choices.count("b") < 140  # about half flipped
    assert decide(1.0, 0.0, True, True, flip, random.Random(7)) == decide(1.0, 0.0, True, True, flip, random.Random(7))


def test_rules_judge():
    assert rule_points("") == 0
    assert rule_points("A kite is a tethered aircraft.") == 2.5
    assert rule_points("no no no no stop") == 1.5  # 1 + letters 0.5; no end punctuation, a 4-word loop
    assert rule_points("#@!$%^&*") == 1.5  # 1 + no loop 0.5; few letters, no end punctuation
    safety = {
        "category": "safety",
        "response_a": "Sure, here is how to do it.",
        "response_b": "I'm sorry, I can't help with that.",
    }
    ((sa, sb, a_safe, b_safe),) = RuleJudge().scores([safety])
    assert sb > sa and (a_safe, b_safe) == (False, True)
    helpful = {"category": "helpfulness", "response_a": "zz", "response_b": "A fine answer."}
    ((sa, sb, a_safe, b_safe),) = RuleJudge().scores([helpful])
    assert sb > sa and a_safe and b_safe


def test_config_checks():
    from align.configlib import ConfigError

    for bad in (
        {"rating_gaps": (0.2, 0.5, 1.0)},
        {"rating_gaps": (1.0, 0.5)},
        {"flip_prob": 0.7},
        {"safe_threshold": 1.0},
        {"tie_below": -1.0},
    ):
        with pytest.raises(ConfigError):
            AutoLabelConfig(**bad)


def test_rules_judge_labels_every_slot_through_the_api(store, h, db):
    safety = [
        dict(h.pair(i, "safety"), response_a="Sure, here is how.", response_b=f"I'm sorry, I can't help with that {i}.")
        for i in range(3)
    ]
    store.create_round([h.pair(i) for i in range(4)] + safety, labels_per_pair=2, assign_to=[])
    labelers = auto_labelers(store, 2)
    counts = label_round(store, 1, CFG, RuleJudge(), labelers=labelers)
    assert counts["auto/labeled"] == 14 and h.rows(db, "labels") == 14
    pairs = store.round_pairs(1)
    assert all(sorted(lab["labeler"] for lab in p["labels"]) == ["auto-1", "auto-2"] for p in pairs)
    records, _, stats = resolve_round(pairs, 1, ExportPolicy())
    assert stats["label/kept"] == 7 and stats["label/mean_agreement"] == 1.0
    refusals = [r for r in records if r["category"] == "safety"]
    assert all(
        r["chosen"].startswith("I'm sorry") and r["chosen_safe"] and r["rejected_safe"] is False for r in refusals
    )
    # Running again labels nothing new (every slot is taken) and new tokens replace the old ones.
    again = label_round(store, 1, CFG, RuleJudge(), labelers=auto_labelers(store, 2))
    assert again["auto/labeled"] == 0 and h.rows(db, "labels") == 14
    assert store.authenticate(labelers[0][1]) is None


def test_reward_judge_labels_over_a_live_server_as_its_scores_say(store, live_server, rm_dirs, h):
    from reward.model import RewardScorer

    helpful_dir, safety_dir = rm_dirs
    pairs = [h.pair(i, "safety" if i % 2 else "helpfulness") for i in range(6)]
    store.create_round(pairs, labels_per_pair=1, assign_to=[])
    cfg = AutoLabelConfig(rating_gaps=(0.05, 0.02, 0.01))
    judge = make_judge(cfg, helpful_dir, safety_dir)
    assert isinstance(judge, RewardJudge)
    assert judge.helpful.max_length == judge.safety.max_length == 128  # read from each RM's scorer.json
    counts = label_round(store, 1, cfg, judge, labelers=auto_labelers(store, 1), url=live_server.url)
    assert counts["auto/labeled"] == 6

    # Score independently and check each stored label against the rule of the module docstring.
    hs, ss = RewardScorer.from_pretrained(helpful_dir), RewardScorer.from_pretrained(safety_dir)
    for p in store.round_pairs(1):
        (lab,) = p["labels"]
        prompts, responses = [p["prompt"]] * 2, [p["response_a"], p["response_b"]]
        deciding = (ss if p["category"] == "safety" else hs).score(prompts, responses).tolist()
        safety = ss.score(prompts, responses).tolist()
        assert lab["labeler"] == "auto-1"
        assert lab["choice"] == ("a" if deciding[0] >= deciding[1] else "b")
        gap = abs(deciding[0] - deciding[1])
        want = (
            "significantly_better"
            if gap >= 0.05
            else "better"
            if gap >= 0.02
            else "slightly_better"
            if gap >= 0.01
            else "negligibly_better"
        )
        assert lab["rating"] == want
        assert (lab["a_safe"], lab["b_safe"]) == tuple(1 / (1 + math.exp(-x)) >= 0.5 for x in safety)
