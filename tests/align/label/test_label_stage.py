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


def test_gold_pairs_mixed_into_a_round_and_kept_out_of_its_export(configs, tmp_path):
    from align.configlib import replace
    from align.data.load import load_datasets
    from align.label.store import LabelStore

    cfg, label = configs
    label = replace(label, labels_per_pair=2, prompts_per_round=4, gold=_pref_spec(), gold_per_labeler=3)
    db = tmp_path / "gold.db"
    s = run_label_round(cfg, label, 1, tmp_path / "out", db=db)
    assert s["label/gold_pairs"] == 3 and s["label/quality/gold_pairs"] == 3
    assert s["label/quality/gold_labels"] == 2 * 3  # both auto labelers label every gold pair
    assert 0.0 <= s["label/quality/gold_accuracy"] <= 1.0
    assert "label/quality/labeler/auto-1/gold_accuracy" in s
    store = LabelStore.open(db)
    try:
        gold = [p for p in store.round_pairs(1) if p["gold"]]
    finally:
        store.close()
    assert len(gold) == 3
    rows = (tmp_path / "out" / "agreement.jsonl").read_text().splitlines()
    assert len(rows) == s["label/pairs"]
    exported = (tmp_path / "out" / "preference.jsonl").read_text()
    assert not any(g["response_a"] in exported or g["response_b"] in exported for g in gold)
    # The gold pairs are the known answers of the gold dataset: each chosen response is the one marked.
    records, _ = load_datasets(label.gold, "preference", cfg.data_dir, cfg.data.bad_rows, cfg.seed)
    chosen = {r["chosen"] for r in records.to_list()}
    assert all(g[f"response_{g['gold']}"] in chosen for g in gold)


def _pref_spec():
    from align.config import DatasetSpec

    return (DatasetSpec(format="synthetic_pref", limit=8),)
