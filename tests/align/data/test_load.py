"""load_records / to_dataset / load_datasets: paths, limit, category, and the datasets round trip."""

from __future__ import annotations

import json

import pytest

from align.config import DatasetSpec
from align.data.load import load_datasets, load_records, to_dataset
from align.data.schema import FEATURES
from align.data.validate import DataError

HH = "hh-rlhf/harmless-base-test.dev.jsonl.gz"

# Every (format, file, kind) a real importer serves, and the generated ones.
REAL = [
    ("alpaca", "llamafactory/alpaca_en_demo.json", "conversation"),
    ("oasst", "oasst/en_100_tree.jsonl", "conversation"),
    ("oasst", "oasst/en_100_tree.jsonl", "preference"),
    ("oasst", "oasst/en_100_tree.jsonl", "prompt"),
    ("hh", HH, "preference"),
    ("hh", HH, "prompt"),
    ("xstest", "xstest/xstest_prompts.csv", "prompt"),
    ("sharegpt_dpo", "llamafactory/dpo_en_demo.json", "preference"),
    ("oasst_prompts", "oasst/prompt_lottery_en_250_text.jsonl", "prompt"),
]
SYNTHETIC = [
    ("synthetic_sft", "", "conversation"),
    ("synthetic_pref", "", "preference"),
    ("synthetic_prompts", "", "prompt"),
]


def roundtrip(records, kind):
    dataset = to_dataset(records, kind)
    assert dataset.features == FEATURES[kind]
    assert len(dataset) == len(records)
    # Every field survives Arrow exactly (None stays None; margins are float32, so compare as such).
    assert dataset.to_list() == records


@pytest.mark.parametrize("format, path, kind", REAL, ids=[f"{f}-{k}" for f, _, k in REAL])
def test_every_real_record_roundtrips_through_datasets(shared_data, format, path, kind):
    records, report = load_records(DatasetSpec(format=format, path=path), kind, shared_data, bad_rows="skip")
    assert report.n_kept == len(records) > 0
    roundtrip(records, kind)


@pytest.mark.parametrize("format, path, kind", SYNTHETIC, ids=[f for f, _, _ in SYNTHETIC])
def test_synthetic_records_roundtrip_through_datasets(format, path, kind):
    records, report = load_records(DatasetSpec(format=format), kind, "unused", seed=1)
    assert report.path == f"<{format}>" and report.n_kept == 64
    roundtrip(records, kind)


def test_explicit_margins_roundtrip(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}) + "\n", encoding="utf-8")
    records, _ = load_records(DatasetSpec(format="trl_jsonl", path=str(path)), "preference", "unused")
    assert to_dataset(records, "preference")[0]["margin"] == 1.5


def test_relative_paths_resolve_against_data_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.jsonl").write_text('"hello"\n', encoding="utf-8")
    records, report = load_records(DatasetSpec(format="oasst_prompts", path="sub/p.jsonl"), "prompt", tmp_path)
    assert records[0]["prompt"][0]["content"] == "hello"
    assert report.path == str(tmp_path / "sub" / "p.jsonl")
    # An absolute path ignores data_dir.
    absolute = DatasetSpec(format="oasst_prompts", path=str(tmp_path / "sub" / "p.jsonl"))
    assert load_records(absolute, "prompt", "/nonexistent")[0] == records


def test_missing_file_names_the_path_and_data_dir(tmp_path):
    with pytest.raises(
        DataError,
        match=rf"data file {tmp_path}/nope.jsonl does not exist \(path 'nope.jsonl' is "
        rf"relative to data_dir '{tmp_path}': set the config's data_dir key",
    ):
        load_records(DatasetSpec(format="hh", path="nope.jsonl"), "preference", tmp_path)
    with pytest.raises(DataError, match=r"data file /nonexistent/x.jsonl does not exist; check"):
        load_records(DatasetSpec(format="hh", path="/nonexistent/x.jsonl"), "preference", tmp_path)
    with pytest.raises(DataError, match="is a directory"):
        load_records(DatasetSpec(format="hh", path="."), "preference", tmp_path)


def test_limit_is_a_seeded_sample_in_file_order(shared_data):
    spec = DatasetSpec(format="xstest", path="xstest/xstest_prompts.csv", limit=20)
    every, _ = load_records(DatasetSpec(format="xstest", path="xstest/xstest_prompts.csv"), "prompt", shared_data)
    first, report = load_records(spec, "prompt", shared_data, seed=0)
    again, _ = load_records(spec, "prompt", shared_data, seed=0)
    other, _ = load_records(spec, "prompt", shared_data, seed=1)
    assert len(first) == report.n_kept == 20 and report.n_records == 450
    assert first == again and first != other
    positions = [every.index(r) for r in first]
    assert positions == sorted(positions)
    assert positions != list(range(20))  # a sample, not the head of the file


def test_limit_counts_records_after_skipping(shared_data):
    records, report = load_records(DatasetSpec(format="hh", path=HH, limit=1846), "preference", shared_data, "skip")
    assert len(records) == 1846 and report.n_skipped == 3


def test_category_override(shared_data):
    spec = DatasetSpec(format="sharegpt_dpo", path="llamafactory/dpo_en_demo.json", category="safety")
    records, _ = load_records(spec, "preference", shared_data)
    assert {r["category"] for r in records} == {"safety"}


def test_category_on_a_non_preference_dataset_is_an_error():
    with pytest.raises(DataError, match="category 'safety' applies to preference pairs only"):
        load_records(DatasetSpec(format="synthetic_sft", category="safety"), "conversation", ".")


def test_load_datasets_concatenates_in_order(shared_data):
    specs = [
        DatasetSpec(format="synthetic_pref", limit=5),
        DatasetSpec(format="sharegpt_dpo", path="llamafactory/dpo_en_demo.json", limit=7),
    ]
    dataset, reports = load_datasets(specs, "preference", shared_data, "fail", seed=0)
    assert len(dataset) == 12 and dataset.features == FEATURES["preference"]
    assert dataset["source"] == ["synthetic_pref"] * 5 + ["sharegpt_dpo"] * 7
    assert [r.n_kept for r in reports] == [5, 7]


def test_load_datasets_with_no_specs_is_empty_but_typed():
    dataset, reports = load_datasets([], "prompt", ".", "fail")
    assert len(dataset) == 0 and dataset.features == FEATURES["prompt"] and reports == []
