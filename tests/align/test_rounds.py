"""RLHF rounds: label -> retrain the RMs on all rounds' labels, repeated, with the automatic labeler."""
import json
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import instances, run_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_three_rounds_with_the_auto_labeler(tmp_path):
    label = ("label={init: sft, prompts: [{format: synthetic_prompts, limit: 24}], prompts_per_round: 8, "
             "sampling_a: {temperature: 0.7, max_new_tokens: 16}, sampling_b: {temperature: 1.3, max_new_tokens: 16}, "
             "auto: {judge: reward}}")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path}/run", "stages=[sft,rm_helpful,rm_safety]", "rounds=3",
        "round_stages=[label,rm_helpful,rm_safety]", label, "rollout.engine=transformers",
        "sft.train.max_steps=2", "rm_helpful.train.max_steps=2", "rm_safety.train.max_steps=2"])
    names = [i[0] for i in instances(cfg)]
    assert names == ["sft", "rm_helpful", "rm_safety", "label.r2", "rm_helpful.r2", "rm_safety.r2",
                     "label.r3", "rm_helpful.r3", "rm_safety.r3"]
    manifests = {m["stage"]: m for m in run_pipeline(cfg)}
    run_dir = Path(cfg.run_dir)
    for r in (2, 3):
        rows = [json.loads(x) for x in (run_dir / f"label.r{r}" / "preference.jsonl").read_text().splitlines()]
        assert rows and all(x["source"] == f"label:round-{r}" for x in rows)
    # Each retrained RM reads the labels of every round so far.
    assert manifests["rm_helpful"]["summary"]["data/label_rounds"] == 0
    assert manifests["rm_helpful.r2"]["summary"]["data/label_rounds"] == 1
    assert manifests["rm_helpful.r3"]["summary"]["data/label_rounds"] == 2
    s2, s3 = manifests["rm_safety.r2"]["summary"], manifests["rm_safety.r3"]["summary"]
    assert s3["data/primary_pairs"] + s3["data/secondary_pairs"] > s2["data/primary_pairs"] + s2["data/secondary_pairs"]
    # Labels are stored once per round; rerunning does not generate or label again.
    again = {m["stage"]: m for m in run_pipeline(cfg)}
    assert again["label.r3"]["finished_at"] == manifests["label.r3"]["finished_at"]
