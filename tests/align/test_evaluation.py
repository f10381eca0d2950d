"""The eval stage's pieces: win rates by hand, and `align eval` on a finished tiny run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.evaluation import win_rate

ROOT = Path(__file__).resolve().parents[2]


def test_win_rate_counts_ties_half():
    assert win_rate([0.9, 0.2, 0.5], [0.1, 0.3, 0.5]) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.mark.slow
def test_align_eval_on_a_tiny_run(tmp_path):
    from align.config import load_config
    from align.pipeline import run_pipeline

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={tmp_path}/run",
            "stages=[sft,rm_helpful,rm_safety]",
            "sft.train.max_steps=4",
            "rm_helpful.train.max_steps=2",
            "rm_safety.train.max_steps=2",
        ],
    )
    run_pipeline(cfg)
    ev = (
        "eval={prompts: [{format: synthetic_prompts, limit: 16}], num_prompts: 6, "
        "sampling: {temperature: 1.0, max_new_tokens: 12}}"
    )
    res = subprocess.run(
        [sys.executable, "-m", "align.cli", "eval", cfg.run_dir, ev, "rollout.engine=transformers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(cfg.run_dir) / "eval_adhoc"
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert metrics["eval/sft/winrate_helpful_vs_sft"] == 0.5  # a checkpoint against itself
    assert 0 <= metrics["eval/base/helpful_mean"] <= 1
    assert metrics["eval/sft/lc_winrate_helpful_vs_sft"] == pytest.approx(0.5)  # all ties, equal lengths
    for name in ("base", "sft"):  # every figure has its interval around it
        for key in ("helpful_mean", "winrate_helpful_vs_sft", "lc_winrate_safety_vs_sft"):
            k = f"eval/{name}/{key}"
            assert metrics[k + "_lo"] <= metrics[k] + 1e-9 and metrics[k] <= metrics[k + "_hi"] + 1e-9, k
    table = (out / "eval.md").read_text()
    assert "LC win, helpful" in table and "6 held-out prompts" in table
    assert (out / "eval_winrates.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["checkpoint"] for r in rows} == {"base", "sft"} and len(rows) == 12
