"""Rounds labeled by people (label.judge: people): stop while incomplete, completion rules, waiting,
the export of a complete round. The rounds are put in the store by hand (no model needed); the
pipeline test on the tiny model is tests/align/test_rounds.py."""

from __future__ import annotations

import json

import pytest

from align.configlib import replace
from align.errors import LabelingPending
from align.label.config import load_label_config
from align.label.stage import progress_line, round_progress, run_label_round, wait_for_round

YAML = """
seed: 0
stages: [sft]
precision: fp32
model: {source: tiny}
sft: {datasets: [{format: synthetic_sft}]}
label:
  init: base
  prompts: [{format: synthetic_prompts, limit: 4}]
  labels_per_pair: 2
  judge: people
"""


@pytest.fixture
def configs(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    return load_label_config(path, [f"run_dir={tmp_path / 'run'}"])


@pytest.fixture
def people(store, h):
    """Round 1 of 4 pairs (2 labels each, claimed on demand) and two labelers' tokens."""
    store.create_round([h.pair(i) for i in range(4)], number=1, labels_per_pair=2, assign_to=[])
    return {"ann": store.add_labeler("ann"), "bob": store.add_labeler("bob")}


def label(client, token, h, choices):
    """The labeler labels the pairs the API offers, one by one, with the given choices in order."""
    done = []
    for choice in choices:
        (p,) = client.get("/api/pairs/next", headers=h.auth(token)).json()["pairs"]
        body = {"pair_id": p["id"], "choice": choice, "a_safe": True, "b_safe": True}
        if choice in ("a", "b"):
            body["rating"] = "better"
        res = client.post("/api/labels", headers=h.auth(token), json=body)
        assert res.status_code == 200, res.text
        done.append(p["id"])
    return done


def test_progress_rules():
    row = {"round": 2, "pairs": 10, "complete_pairs": 8}
    assert round_progress(row) == {"round": 2, "pairs": 10, "complete": 8, "needed": 10, "done": False}
    assert round_progress(row, 0.8)["done"] and round_progress(row, 0.9)["needed"] == 9
    assert round_progress({"round": 1, "pairs": 3, "complete_pairs": 0}, 0.01)["needed"] == 1
    assert progress_line(round_progress(row, 0.9)) == "round 2: 8 of 10 pairs labeled (9 needed)"
    assert progress_line(round_progress(row)) == "round 2: 8 of 10 pairs labeled"


def test_incomplete_round_stops_then_exports_once_labeled(configs, store, people, client, h, db, tmp_path):
    cfg, lab = configs
    out = tmp_path / "out"
    with pytest.raises(LabelingPending) as e:
        run_label_round(cfg, lab, 1, out, db=db)
    assert str(e.value) == f"round 1: 0 of 4 pairs labeled; serve with: align label serve --db {db}; rerun to continue"
    assert not out.exists()
    label(client, people["ann"], h, ["a", "a", "b", "tie"])
    label(client, people["bob"], h, ["a", "b", "b"])
    with pytest.raises(LabelingPending, match="round 1: 3 of 4 pairs labeled;"):
        run_label_round(cfg, lab, 1, out, db=db)
    label(client, people["bob"], h, ["tie"])
    s = run_label_round(cfg, lab, 1, out, db=db)
    # Pairs: (a, a) kept, (a, b) no majority, (b, b) kept, (tie, tie) dropped as a tie.
    assert (s["label/kept"], s["label/dropped/no_majority"], s["label/dropped/tie"], s["label/labels"]) == (2, 1, 1, 8)
    assert s["label/complete_pairs"] == 4 and s["label/dropped/incomplete"] == 0
    # ann (a, a, b, tie) vs bob (a, b, b, tie): p_o 3/4; p_e = (2/4)(1/4) + (1/4)(2/4) + (1/4)(1/4) = 5/16.
    assert s["label/quality/cohen_kappa"] == pytest.approx((3 / 4 - 5 / 16) / (1 - 5 / 16))
    assert s["label/quality/labeler/ann/majority_agreement"] == pytest.approx(3 / 4)
    rows = [json.loads(x) for x in (out / "preference.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["rating"] == "better" for r in rows)
    table = (out / "quality.md").read_text()  # the run report shows it under the stage
    assert "| ann | 4 | 0 | 75% (n=4) | - (n=0) |" in table and "Cohen's kappa 0.64 over 4 pairs" in table
    assert len(store.rounds()) == 1  # nothing generated


def test_min_complete_share_drops_the_rest(configs, store, people, client, h, db, tmp_path):
    cfg, lab = configs
    label(client, people["ann"], h, ["a", "a", "a"])
    label(client, people["bob"], h, ["a"])  # bob labels one pair and leaves
    with pytest.raises(LabelingPending, match=r"1 of 4 pairs labeled \(2 needed\)"):
        run_label_round(cfg, replace(lab, min_complete_share=0.5), 1, tmp_path / "out", db=db)
    label(client, people["bob"], h, ["a"])
    s = run_label_round(cfg, replace(lab, min_complete_share=0.5), 1, tmp_path / "out", db=db)
    # 2 pairs complete; one pair has only ann's vote and one none: both dropped, not exported.
    assert (s["label/kept"], s["label/dropped/incomplete"], s["label/dropped/unlabeled"]) == (2, 1, 1)
    assert s["label/needed_pairs"] == 2
    # The round is closed: the two dropped pairs are no longer offered, and a late label is refused.
    assert store.rounds()[0]["closed"]
    for name in ("ann", "bob"):
        assert client.get("/api/pairs/next", headers=h.auth(people[name])).json()["pairs"] == []
    mine = client.get("/api/labels", headers=h.auth(people["ann"])).json()["labels"][0]["pair_id"]
    late = {"pair_id": mine, "choice": "tie", "a_safe": True, "b_safe": True}
    res = client.post("/api/labels", headers=h.auth(people["ann"]), json=late)
    assert res.status_code == 409 and "closed" in res.json()["detail"]


def test_wait_polls_until_the_round_is_complete(store, people, client, h):
    t = [0.0]
    said = []
    posts = iter(
        [lambda: label(client, people["ann"], h, ["a"] * 4), lambda: label(client, people["bob"], h, ["b"] * 4)]
    )

    def sleep(s):  # time passes while the labelers work
        t[0] += s
        next(posts, lambda: None)()

    got = wait_for_round(store, 1, 1.0, 60, poll_s=5, clock=lambda: t[0], sleep=sleep, say=said.append)
    assert got["done"] and t[0] == 10
    assert said == ["round 1: 0 of 4 pairs labeled", "round 1: 4 of 4 pairs labeled"]
    # A timeout returns the progress so far (the caller then stops the run).
    store.create_round([h.pair(9)], number=2, labels_per_pair=2, assign_to=[])
    got = wait_for_round(store, 2, 1.0, 12, poll_s=5, clock=lambda: t[0], sleep=sleep, say=said.append)
    assert not got["done"] and t[0] == 22


def test_config_checks(tmp_path):
    from align.configlib import ConfigError

    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    for bad, key in (("label.min_complete_share=0", "min_complete_share"), ("label.judge=crowd", "judge")):
        with pytest.raises(ConfigError, match=key):
            load_label_config(path, [bad])
