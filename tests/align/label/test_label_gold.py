"""Gold pairs (a known answer, mixed into every labeler's queue), closing a round, and undo, on
hand-made label sets in a real store."""

from __future__ import annotations

import json

import pytest

from align.label.export import ExportPolicy, export_round, resolve_round
from align.label.generate import gold_pairs
from align.label.store import Conflict, NotFound


def gold(i: int, answer: str, h) -> dict:
    return {**h.pair(100 + i), "answer": answer, "source": "gold"}


def take(store, labeler, choice="a"):
    """The labeler takes the next pair offered and labels it ``choice``; returns the pair id (None: nothing)."""
    got = store.next_pairs(labeler.id)
    if not got:
        return None
    rating = "better" if choice in ("a", "b") else None
    safe = None if choice == "skip" else True
    store.submit_label(labeler.id, got[0]["id"], choice, rating, safe, safe)
    return got[0]["id"]


@pytest.fixture
def ann_bob(store):
    store.add_labeler("ann")
    store.add_labeler("bob")
    return store.labelers()


def test_gold_pairs_spread_over_the_round_and_offered_to_every_labeler(store, ann_bob, h):
    ann, bob = ann_bob
    store.create_round(
        [h.pair(i) for i in range(4)], labels_per_pair=1, assign_to=[], gold=[gold(0, "a", h), gold(1, "b", h)]
    )
    pairs = store.round_pairs(1)
    # 4 regular, 2 gold: gold j goes before regular pair floor((j + 1) * 4 / 3): R0 G0 R1 G1 R2 R3.
    assert [p["gold"] for p in pairs] == [None, "a", None, "b", None, None]
    (r,) = store.rounds()
    assert (r["pairs"], r["gold_pairs"], r["complete_pairs"], r["closed"]) == (4, 2, 0, False)
    # One label per regular pair: ann and bob share them, but each gets both gold pairs.
    seen = {"ann": [], "bob": []}
    while True:
        got = [take(store, ann), take(store, bob)]
        seen["ann"].append(got[0])
        seen["bob"].append(got[1])
        if got == [None, None]:
            break
    ids = [p["id"] for p in pairs]
    gold_ids = {ids[1], ids[3]}
    assert gold_ids <= set(seen["ann"]) and gold_ids <= set(seen["bob"])
    assert seen["ann"][1] == ids[1]  # the gold pair comes mid-queue, in the round's order
    r = store.rounds()[0]
    assert (r["complete_pairs"], r["labels"], r["gold_labels"]) == (4, 4, 4)


def test_gold_answer_is_checked(store, h):
    from align.label.store import InvalidInput

    with pytest.raises(InvalidInput, match="gold pair 0: needs answer"):
        store.create_round([h.pair(0)], gold=[{**h.pair(1), "answer": "tie"}])
    assert store.counts()["rounds"] == 0


def test_gold_accuracy_in_agreement_and_excluded_from_export(store, ann_bob, h, tmp_path):
    from align.label.agreement import round_agreement

    ann, bob = ann_bob
    store.create_round([h.pair(i) for i in range(2)], labels_per_pair=2, assign_to=[], gold=[gold(0, "a", h)])
    # Round order: R0 G0 R1. ann: a, a (gold right), a. bob: a, b (gold wrong), a.
    for labeler, choices in ((ann, "aaa"), (bob, "aba")):
        for c in choices:
            take(store, labeler, c)
    pairs = store.round_pairs(1)
    got = round_agreement(pairs, 2)
    assert got["labelers"]["ann"]["gold_accuracy"] == 1.0 and got["labelers"]["bob"]["gold_accuracy"] == 0.0
    assert got["gold_accuracy"] == 0.5 and got["majority_agreement"] == 1.0 and got["labels"] == 4
    records, rows, stats = resolve_round(pairs, 1, ExportPolicy())
    assert (len(records), len(rows), stats["label/pairs"], stats["label/gold_pairs"]) == (2, 2, 2, 1)
    gold_text = h.pair(100)["response_a"]
    export_round(store, 1, tmp_path / "out")
    text = (tmp_path / "out" / "preference.jsonl").read_text()
    assert gold_text not in text and len(text.splitlines()) == 2
    assert all(
        json.loads(x)["pair_id"] != pairs[1]["id"]
        for x in (tmp_path / "out" / "agreement.jsonl").read_text().splitlines()
    )


def test_gold_pairs_from_preference_records():
    recs = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            "category": "safety",
        }
        for i in range(6)
    ]
    got = gold_pairs(recs, 4, seed=0, round_number=2)
    assert len(got) == 4 and got == gold_pairs(recs, 4, seed=0, round_number=2)  # seeded
    for g in got:
        assert g[f"response_{g['answer']}"].startswith("good") and g["category"] == "safety"
    assert {g["answer"] for g in gold_pairs(recs, 0, 0, 1)} == {"a", "b"}  # both sides used (6 draws)
    assert len(gold_pairs(recs, 0, 0, 1)) == 6


def test_a_closed_round_offers_nothing_and_takes_no_labels(store, ann_bob, h):
    ann, bob = ann_bob
    store.create_round([h.pair(i) for i in range(3)], labels_per_pair=1, assign_to=[], gold=[gold(0, "b", h)])
    first = take(store, ann)
    assert store.progress(bob.id)["available"] == 3  # 2 regular slots + the gold pair
    store.close_round(1)
    store.close_round(1)  # again: a no-op
    assert store.rounds()[0]["closed"]
    assert store.next_pairs(bob.id, limit=10) == [] and store.next_pairs(ann.id, limit=10) == []
    assert store.progress(bob.id) == {"labeled": 0, "assigned": 0, "available": 0}
    with pytest.raises(Conflict, match="round 1 is closed"):
        store.submit_label(ann.id, first, "b", "better", True, True)
    with pytest.raises(NotFound, match="no label to undo"):
        store.undo_last(ann.id)
    # A new round is offered as usual.
    store.create_round([h.pair(9)], labels_per_pair=1, assign_to=[])
    assert [p["round"] for p in store.next_pairs(bob.id)] == [2]


def test_undo_removes_my_latest_label_and_gives_the_pair_back(store, ann_bob, h):
    ann, bob = ann_bob
    store.create_round([h.pair(i) for i in range(3)], labels_per_pair=2, assign_to=[])
    p1, p2 = take(store, ann, "a"), take(store, ann, "tie")
    take(store, bob, "b")
    out = store.undo_last(ann.id)
    assert out["label"]["pair_id"] == p2 and out["label"]["choice"] == "tie" and out["pair"]["id"] == p2
    assert [lab["pair_id"] for lab in store.labels_of(ann.id)] == [p1]
    assert [lab["labeler"] for lab in store.labels_of(bob.id)] == ["bob"]  # bob's label untouched
    assert store.next_pairs(ann.id)[0]["id"] == p2  # still assigned: offered again first
    # A resubmission is the latest label: undo takes it.
    store.submit_label(ann.id, p1, "b", "slightly_better", True, False)
    undone = store.undo_last(ann.id)["label"]
    assert (undone["pair_id"], undone["choice"], undone["revision"]) == (p1, "b", 2)
    assert store.labels_of(ann.id) == []
    with pytest.raises(NotFound):
        store.undo_last(ann.id)
