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


def _pairs(source, prompts):
    return [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": f"good {p}",
            "rejected": f"bad {p}",
            "rating": "better",
            "category": "helpfulness",
            "source": source,
        }
        for p in prompts
    ]


@pytest.mark.parametrize("dedup", [True, False])
def test_build_splits_counts_duplicates_and_cross_source_overlap(monkeypatch, dedup):
    from types import SimpleNamespace

    import reward.stage
    from reward.mixture import prompt_key
    from reward.stage import build_splits

    # primary: 2 sources sharing every prompt, one pair twice; secondary: one copy of a primary pair
    a = _pairs("a", [f"q{i}" for i in range(12)])
    primary = a + [dict(a[0])] + _pairs("b", [f"q{i}" for i in range(12)])
    for r in primary[13:]:
        r["chosen"] = "another " + r["chosen"]  # b's pairs differ from a's, their prompts do not
    secondary = [{**a[5], "source": "c"}] + _pairs("c", [f"s{i}" for i in range(12)])
    data = {"p": primary, "s": secondary}
    monkeypatch.setattr(
        reward.stage,
        "load_pairs",
        lambda _cfg, specs, _seed: ([dict(r) for r in data[specs[0]]], [SimpleNamespace(n_skipped=0)]),
    )
    cfg = SimpleNamespace(
        primary=["p"],
        secondary=["s"],
        test_size=3,
        test_pairs_per_prompt=0,
        balance_length=False,
        secondary_share=0.5,
        category="helpfulness",
    )
    train, test, stats = build_splits(cfg, SimpleNamespace(data=SimpleNamespace(dedup=dedup)), seed=0)
    assert stats["data/duplicates_dropped"] == (2 if dedup else 0)
    # a's held-out prompts are b's too (and b's a's): the training pairs that share one leave that side
    held = {prompt_key(r) for r in test}
    assert not held & {prompt_key(r) for r in train}
    own = {src: {prompt_key(r) for r in test if r["source"] == src} for src in "abc"}
    used = [r for i, r in enumerate(primary + secondary) if not (dedup and i in (12, 25))]
    shared = sum(prompt_key(r) in held and prompt_key(r) not in own[r["source"]] for r in used)
    assert stats["data/heldout_overlap_dropped"] == shared >= 3
    assert stats["data/test_pairs"] == len(test) == 9  # the test set stays as drawn: 3 per source
