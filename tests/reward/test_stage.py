"""The reward-model stages inside the pipeline, on the tiny config."""

import json
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_rm_stages_train_evaluate_and_report(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}/run", "sft.train.max_steps=2"])
    manifests = {m["stage"]: m for m in run_pipeline(cfg)}
    for name in ("rm_helpful", "rm_safety"):
        d = Path(cfg.run_dir) / name
        s = manifests[name]["summary"]
        # The synthetic preference is easy: held-out accuracy far above chance, reported per level.
        assert s["eval/rm/accuracy"] >= 0.8
        for level in ("significantly_better", "better", "slightly_better", "negligibly_better"):
            assert f"eval/rm/accuracy/{level}" in s
        assert (d / "eval_gaps.png").stat().st_size > 1000 and (d / "eval_calibration.png").stat().st_size > 1000
        assert "eval/rm/length/balanced_accuracy" in s and "length-balanced" in (d / "eval.md").read_text()
        settings = json.loads((d / "model" / "scorer.json").read_text())
        assert settings["max_length"] == cfg.stage(name).max_length and settings["dtype"] == cfg.compute.dtype
        assert "significantly_better" in (d / "eval.md").read_text()
        ev = json.loads((d / "eval.json").read_text())
        assert ev["n_pairs"] == s["data/test_pairs"]
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(d / "model")
    # The safety RM's mixture is 90/10: n safety pairs after the hold-out -> round(n / 9) helpfulness pairs.
    from reward.mixture import prompt_key
    from reward.stage import build_splits

    train, test, _ = build_splits(cfg.stage("rm_safety"), cfg, cfg.seed)
    n_safety = sum(r["category"] == "safety" for r in train)
    assert len(train) - n_safety == round(n_safety / 9) > 0
    assert manifests["rm_safety"]["summary"]["data/train_pairs"] == len(train)
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}  # no held-out prompt trained on
