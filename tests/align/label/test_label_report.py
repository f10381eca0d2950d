"""The labeling figures as shown to people (align/label/report.py): status lines, the quality table
and the run report's headline, from hand-made label sets."""

from __future__ import annotations

from align.label.report import label_headline, quality_table, round_quality, status_lines


def test_status_lines_and_round_quality(store, h):
    assert status_lines(store) == ["no rounds yet"]
    store.add_labeler("ann")
    (ann,) = store.labelers()
    store.create_round([h.pair(0), h.pair(1)], assign_to=["ann"], gold=[{**h.pair(5), "answer": "b"}])
    for p in store.round_pairs(1):
        store.submit_label(ann.id, p["id"], "a", "better", True, True)
    store.close_round(1)
    (r,) = round_quality(store)
    assert "settings" not in r and r["agreement"]["gold_accuracy"] == 0.0
    lines = status_lines(store)
    assert lines[0] == "round 1: 2 of 2 pairs complete (x 1 labels); 2 labels, 0 skips; 1 gold pairs; closed"
    assert lines[1].endswith("gold accuracy 0% of 1") and lines[2].startswith("    ann: 2 labels, 0 skips")
    table = quality_table(r["agreement"])
    assert "| ann | 2 | 0 | - (n=0) | 0% (n=1) |" in table


def test_label_headline():
    s = {
        "round": 2,
        "label/pairs": 10,
        "label/kept": 7,
        "label/complete_pairs": 9,
        "label/quality/majority_agreement": 0.8,
        "label/quality/cohen_kappa": 0.55,
        "label/quality/kappa_pairs": 9,
        "label/quality/gold_accuracy": 0.75,
        "label/quality/gold_labels": 8,
    }
    assert label_headline(s) == (
        "round 2: kept 7 of 10 pairs (9 fully labeled); agreement with the majority 80%; "
        "Cohen's kappa 0.55 (n=9); gold accuracy 75% (n=8)"
    )
    assert label_headline({}) == ""
    from align.report import headline

    assert headline("label", s) == label_headline(s)
