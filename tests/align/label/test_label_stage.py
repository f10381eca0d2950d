"""run_label_round: generate -> auto label -> export for one round, on the tiny model; resumable."""

from __future__ import annotations

import json

import pytest

from align.label.config import load_label_config
from align.label.export import load_export
from align.label.stage import run_label_round

YAML = """
seed: 0
stages: [sft]
precision: fp32
model: {source: tiny}
rollout: {engine: transformers, threads: 1, max_model_len: 512}
sft: {datasets: [{format: synthetic_sft}]}
label:
  init: base
  prompts: [{format: synthetic_prompts, limit: 12}]
  prompts_per_round: 8
  sampling_a: {temperature: 0.7, max_new_tokens: 8}
  sampling_b: {temperature: 1.3, max_new_tokens: 8}
  labels_per_pair: 3
  auto: {judge: rules, flip_prob: 0.3}
"""


@pytest.fixture
def configs(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    return load_label_config(path, [f"run_dir={tmp_path / 'run'}"])


def test_one_round_end_to_end_and_resume(configs, tmp_path):
    cfg, label = configs
    out = tmp_path / "run" / "label" / "round-1"
    s1 = run_label_round(cfg, label, 1, out)
    n = s1["label/pairs"]
    assert s1["round"] == 1 and s1["label/prompts"] == 8 and n > 0
    assert s1["auto/labeled"] == 3 * n  # three auto labelers, one slot of every pair each
    ds = load_export(out, cache_dir=tmp_path / "hf")
    assert len(ds) == s1["label/kept"] > 0 and set(ds["source"]) == {"label:round-1"}
    rows = [json.loads(x) for x in (out / "agreement.jsonl").read_text().splitlines()]
    assert len(rows) == n and all(sum(r["votes"].values()) == 3 for r in rows)
    assert s1["label/mean_agreement"] < 1.0  # flip_prob 0.3 makes the three labelers disagree sometimes

    # Resume: the round is not generated again and no slot is labeled twice; the export is the same.
    before = (out / "preference.jsonl").read_text()
    s2 = run_label_round(cfg, label, 1, out)
    assert "label/prompts" not in s2 and s2["auto/labeled"] == 0 and s2["label/kept"] == s1["label/kept"]
    assert (out / "preference.jsonl").read_text() == before


def test_a_round_judged_by_reward_models(configs, tmp_path, rm_dirs):
    from align.configlib import replace

    cfg, label = configs
    helpful, safety = rm_dirs
    label = replace(
        label,
        labels_per_pair=1,
        prompts_per_round=4,
        auto=replace(label.auto, judge="reward", helpful_rm=str(helpful), safety_rm=str(safety), flip_prob=0.0),
    )
    summary = run_label_round(cfg, label, 2, tmp_path / "round-2", db=tmp_path / "other.db")
    assert summary["round"] == 2 and summary["auto/labeled"] == summary["label/pairs"] > 0
    assert summary["label/mean_agreement"] == 1.0


def test_missing_policy_stage_is_a_clear_error(configs, tmp_path):
    from align.configlib import replace
    from align.errors import AlignError

    cfg, label = configs
    with pytest.raises(AlignError, match="stage 'sft' has not finished"):
        run_label_round(cfg, replace(label, init="sft"), 1, tmp_path / "x")
