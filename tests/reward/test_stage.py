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
        assert (d / "eval_gaps.png").stat().st_size > 1000
        assert "significantly_better" in (d / "eval.md").read_text()
        ev = json.loads((d / "eval.json").read_text())
        assert ev["n_pairs"] == s["data/test_pairs"]
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(d / "model")
    # The safety RM's mixture is 90/10: 80 safety pairs after hold-out -> 9 helpfulness pairs mixed in.
    assert manifests["rm_safety"]["summary"]["data/train_pairs"] == 80 + 9
