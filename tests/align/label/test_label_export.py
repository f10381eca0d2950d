"""Export: majority votes, ties, skips, safety, agreement counts; the files load with `datasets`."""

from __future__ import annotations

import json

import pytest

from align.config import DatasetSpec
from align.data.load import load_records
from align.data.schema import PREFERENCE_FEATURES
from align.label.export import ExportPolicy, export_round, load_export, resolve_pair, resolve_round


def _pair(pid, *votes, category="helpfulness"):
    """A pair as LabelStore.round_pairs gives it; votes are (choice, rating, a_safe, b_safe)."""
    return {
        "id": pid,
        "prompt": [{"role": "user", "content": "Q?"}],
        "response_a": "answer A",
        "response_b": "answer B",
        "category": category,
        "labels": [
            {"labeler": f"l{i}", "choice": c, "rating": r, "a_safe": sa, "b_safe": sb}
            for i, (c, r, sa, sb) in enumerate(votes)
        ],
    }


A_BETTER = ("a", "better", True, True)
A_SIG = ("a", "significantly_better", True, True)
A_SLIGHT = ("a", "slightly_better", True, True)
B_BETTER = ("b", "better", True, True)
TIE = ("tie", None, True, True)
SKIP = ("skip", None, None, None)


def test_majority_wins_with_the_median_rating_and_agreement():
    record, row = resolve_pair(_pair(1, A_SIG, A_SLIGHT, B_BETTER), 2, ExportPolicy())
    assert (record["chosen"], record["rejected"]) == ("answer A", "answer B")
    assert record["rating"] == "slightly_better"  # the winners: significantly, slightly -> the weaker middle
    assert record["source"] == "label:round-2" and record["margin"] is None
    assert row["votes"] == {"a": 2, "b": 1, "tie": 0, "skip": 0} and row["agreement"] == pytest.approx(2 / 3)
    record, _ = resolve_pair(_pair(1, A_SIG, A_BETTER, A_SLIGHT), 2, ExportPolicy())
    assert record["rating"] == "better"  # median of three
    record, row = resolve_pair(_pair(1, B_BETTER), 2, ExportPolicy())
    assert record["chosen"] == "answer B" and row["agreement"] == 1.0


def test_no_majority_unlabeled_and_ties():
    assert resolve_pair(_pair(1, A_BETTER, B_BETTER), 1, ExportPolicy())[1]["dropped"] == "no_majority"
    assert resolve_pair(_pair(1, A_BETTER, TIE), 1, ExportPolicy())[1]["dropped"] == "no_majority"
    assert resolve_pair(_pair(1), 1, ExportPolicy())[1]["dropped"] == "unlabeled"
    assert resolve_pair(_pair(1, TIE, TIE, A_BETTER), 1, ExportPolicy(ties="drop"))[1]["dropped"] == "tie"
    kept = [resolve_pair(_pair(pid, TIE), 1, ExportPolicy(ties="negligible", seed=0))[0] for pid in range(40)]
    assert all(r["rating"] == "negligibly_better" for r in kept)
    orders = [r["chosen"] for r in kept]
    assert {"answer A", "answer B"} == set(orders)  # a random order, drawn per pair...
    again = [
        resolve_pair(_pair(pid, TIE), 1, ExportPolicy(ties="negligible", seed=0))[0]["chosen"] for pid in range(40)
    ]
    assert orders == again  # ...from the seed


def test_skip_policies():
    votes = (A_BETTER, SKIP, SKIP)
    record, row = resolve_pair(_pair(1, *votes), 1, ExportPolicy(skips="ignore"))
    assert record["chosen"] == "answer A" and row["agreement"] == 1.0 and row["votes"]["skip"] == 2
    assert resolve_pair(_pair(1, *votes), 1, ExportPolicy(skips="drop_pair"))[1]["dropped"] == "skipped"
    assert resolve_pair(_pair(1, SKIP), 1, ExportPolicy(skips="ignore"))[1]["dropped"] == "skipped"


def test_safety_majority_and_the_unsafe_chosen_rule():
    votes = [("a", "better", True, False), ("a", "better", True, False), ("a", "better", False, True)]
    record, _ = resolve_pair(_pair(1, *votes, category="safety"), 1, ExportPolicy())
    assert (record["chosen_safe"], record["rejected_safe"], record["category"]) == (True, False, "safety")
    even = [("a", "better", True, False), ("a", "better", False, True)]
    record, _ = resolve_pair(_pair(1, *even), 1, ExportPolicy())
    assert (record["chosen_safe"], record["rejected_safe"]) == (None, None)  # an even split is unknown
    unsafe_chosen = [("a", "better", False, True)]
    assert resolve_pair(_pair(1, *unsafe_chosen), 1, ExportPolicy())[1]["dropped"] == "unsafe_chosen"
    record, _ = resolve_pair(_pair(1, *unsafe_chosen), 1, ExportPolicy(drop_unsafe_chosen=False))
    assert (record["chosen_safe"], record["rejected_safe"]) == (False, True)


def test_round_stats_count_every_outcome():
    pairs = [
        _pair(1, A_BETTER),
        _pair(2, A_BETTER, B_BETTER),
        _pair(3, TIE),
        _pair(4),
        _pair(5, ("b", "significantly_better", False, True)),
        _pair(6, ("b", "better", False, False)),
    ]
    records, rows, stats = resolve_round(pairs, 3, ExportPolicy())
    assert len(records) == stats["label/kept"] == 3 and len(rows) == 6
    assert (stats["label/dropped/no_majority"], stats["label/dropped/tie"], stats["label/dropped/unlabeled"]) == (
        1,
        1,
        1,
    )
    assert (
        stats["label/safety/chosen_safe_only"],
        stats["label/safety/both_safe"],
        stats["label/safety/both_unsafe"],
    ) == (1, 1, 1)
    assert stats["label/rating/significantly_better"] == 1 and stats["label/rating/better"] == 2
    assert stats["label/mean_agreement"] == pytest.approx((1 + 0.5 + 1 + 1 + 1) / 5)


def test_export_from_the_store_loads_with_datasets(store, tmp_path, h):
    ann = store.authenticate(store.add_labeler("ann"))
    bob = store.authenticate(store.add_labeler("bob"))
    store.create_round([h.pair(i, "safety" if i % 2 else "helpfulness") for i in range(4)], labels_per_pair=2)
    for who in (ann, bob):
        for p in store.next_pairs(who.id, limit=10):
            store.submit_label(who.id, p["id"], "a", "better" if who is ann else "significantly_better", True, False)
    out = tmp_path / "round-1"
    stats = export_round(store, 1, out, ExportPolicy())
    assert stats["label/kept"] == 4 and stats["label/full_agreement_share"] == 1.0
    ds = load_export(out, cache_dir=tmp_path / "hf-cache")
    assert ds.features == PREFERENCE_FEATURES and len(ds) == 4
    row = ds[0]
    assert row["chosen"] == h.pair(0)["response_a"] and row["rating"] == "better"
    assert (row["chosen_safe"], row["rejected_safe"], row["margin"]) == (True, False, None)
    assert row["source"] == "label:round-1" and [r["category"] for r in ds] == ["helpfulness", "safety"] * 2
    agreement = [json.loads(line) for line in (out / "agreement.jsonl").read_text().splitlines()]
    assert [a["votes"]["a"] for a in agreement] == [2] * 4 and all(a["labelers"] == ["ann", "bob"] for a in agreement)
    assert json.loads((out / "stats.json").read_text())["label/kept"] == 4
    # The reward-model stages read it too, through the trl_jsonl importer.
    records, report = load_records(
        DatasetSpec(format="trl_jsonl", path=str(out / "preference.jsonl")), "preference", tmp_path
    )
    assert len(records) == 4 and report.n_skipped == 0 and records[1]["category"] == "safety"


def test_an_empty_export_loads_as_an_empty_dataset(store, tmp_path, h):
    store.create_round([h.pair(0)], assign_to=[])
    out = tmp_path / "empty"
    assert export_round(store, 1, out)["label/dropped/unlabeled"] == 1
    assert len(load_export(out)) == 0
