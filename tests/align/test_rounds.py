"""RLHF rounds: label -> retrain the RMs on all rounds' labels, repeated, with the automatic labeler."""

import json
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import instances, run_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_three_rounds_with_the_auto_labeler(tmp_path):
    label = (
        "label={init: sft, prompts: [{format: synthetic_prompts, limit: 24}], prompts_per_round: 8, "
        "sampling_a: {temperature: 0.7, max_new_tokens: 16}, sampling_b: {temperature: 1.3, max_new_tokens: 16}, "
        "auto: {judge: reward}}"
    )
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={tmp_path}/run",
            "stages=[sft,rm_helpful,rm_safety]",
            "rounds=3",
            "round_stages=[label,rm_helpful,rm_safety]",
            label,
            "rollout.engine=transformers",
            "sft.train.max_steps=2",
            "rm_helpful.train.max_steps=2",
            "rm_safety.train.max_steps=2",
        ],
    )
    names = [i[0] for i in instances(cfg)]
    assert names == [
        "sft",
        "rm_helpful",
        "rm_safety",
        "label.r2",
        "rm_helpful.r2",
        "rm_safety.r2",
        "label.r3",
        "rm_helpful.r3",
        "rm_safety.r3",
    ]
    manifests = {m["stage"]: m for m in run_pipeline(cfg)}
    run_dir = Path(cfg.run_dir)
    for r in (2, 3):
        rows = [json.loads(x) for x in (run_dir / f"label.r{r}" / "preference.jsonl").read_text().splitlines()]
        assert rows and all(x["source"] == f"label:round-{r}" for x in rows)
    # Each retrained RM reads the labels of every round so far.
    assert manifests["rm_helpful"]["summary"]["data/label_rounds"] == 0
    assert manifests["rm_helpful.r2"]["summary"]["data/label_rounds"] == 1
    assert manifests["rm_helpful.r3"]["summary"]["data/label_rounds"] == 2
    s2, s3 = manifests["rm_safety.r2"]["summary"], manifests["rm_safety.r3"]["summary"]
    assert s3["data/primary_pairs"] + s3["data/secondary_pairs"] > s2["data/primary_pairs"] + s2["data/secondary_pairs"]
    # Labels are stored once per round; rerunning does not generate or label again.
    again = {m["stage"]: m for m in run_pipeline(cfg)}
    assert again["label.r3"]["finished_at"] == manifests["label.r3"]["finished_at"]


@pytest.mark.slow
def test_two_rounds_labeled_by_people(tmp_path, capsys):
    """`align run` stops at round 2's label stage (exit code 3, one line); two labelers label the
    round through the HTTP API; the rerun exports their labels and retrains both RMs on them."""
    from fastapi.testclient import TestClient

    from align.cli import main
    from align.errors import EXIT_LABELING
    from align.label.agreement import cohen_kappa
    from align.label.server import create_app
    from align.label.store import LabelStore
    from align.pipeline import status_table

    run = tmp_path / "run"
    label = (
        "label={init: sft, judge: people, labels_per_pair: 2, prompts: [{format: synthetic_prompts, limit: 12}], "
        "prompts_per_round: 8, sampling_a: {temperature: 0.7, max_new_tokens: 12}, "
        "sampling_b: {temperature: 1.3, max_new_tokens: 12}}"
    )
    argv = [
        "run",
        str(ROOT / "configs" / "tiny.yaml"),
        f"run_dir={run}",
        "stages=[sft,rm_helpful,rm_safety]",
        "rounds=2",
        "round_stages=[label,rm_helpful,rm_safety]",
        label,
        "rollout.engine=transformers",
        "sft.train.max_steps=2",
        "rm_helpful.train.max_steps=2",
        "rm_safety.train.max_steps=2",
    ]
    assert main(argv) == EXIT_LABELING
    db = run / "labels.db"
    store = LabelStore.open(db)
    (rnd,) = store.rounds()
    n = rnd["pairs"]
    assert rnd["round"] == 2 and n > 0 and rnd["assigned"] == 0  # claimed on demand, not assigned
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"align: round 2: 0 of {n} pairs labeled; serve with: align label serve --db {db}; rerun to continue"
    )
    assert all((run / s / "manifest.json").is_file() for s in ("sft", "rm_helpful", "rm_safety"))
    assert not (run / "label.r2").exists() and "waiting on labelers: round 2: 0 of" in status_table(
        load_config(ROOT / "configs" / "tiny.yaml", argv[2:])
    )

    # A rerun before anyone labels stops the same way and generates nothing new.
    assert main(argv) == EXIT_LABELING and store.counts()["pairs"] == n

    choices = {"ann": {}, "bob": {}}
    with TestClient(create_app(store)) as client:
        for name, rule in (("ann", lambda i: "a" if i % 3 else "b"), ("bob", lambda i: "a" if i % 2 else "b")):
            auth = {"Authorization": f"Bearer {store.add_labeler(name)}"}
            while True:
                pairs = client.get("/api/pairs/next", headers=auth).json()["pairs"]
                if not pairs:
                    break
                pid = pairs[0]["id"]
                choices[name][pid] = rule(pid)
                body = {
                    "pair_id": pid,
                    "choice": rule(pid),
                    "rating": "significantly_better" if name == "ann" else "better",
                    "a_safe": True,
                    "b_safe": True,
                }
                assert client.post("/api/labels", headers=auth, json=body).status_code == 200
    store.close()
    assert len(choices["ann"]) == len(choices["bob"]) == n

    assert main(argv) == 0
    m = {
        s: json.loads((run / s / "manifest.json").read_text())
        for s in ("rm_helpful", "label.r2", "rm_helpful.r2", "rm_safety", "rm_safety.r2")
    }
    agreed = sum(choices["ann"][p] == choices["bob"][p] for p in choices["ann"])
    s = m["label.r2"]["summary"]
    assert s["label/labels"] == 2 * n and s["label/kept"] == agreed and s["label/dropped/no_majority"] == n - agreed
    ids = sorted(choices["ann"])
    assert s["label/quality/cohen_kappa"] == pytest.approx(
        cohen_kappa([choices["ann"][p] for p in ids], [choices["bob"][p] for p in ids])
    )
    assert s["label/prompts"] == 8  # the generation counts of the first run reach the manifest
    rows = [json.loads(x) for x in (run / "label.r2" / "preference.jsonl").read_text().splitlines()]
    # The weaker of the two ratings (median of an even count), which sets the RM's margin.
    assert len(rows) == agreed and {r["rating"] for r in rows} == {"better"}
    for rm in ("rm_helpful", "rm_safety"):
        before, after = m[rm]["summary"], m[f"{rm}.r2"]["summary"]
        assert after["data/label_rounds"] == 1
        total = lambda x: x["data/primary_pairs"] + x["data/secondary_pairs"]  # noqa: E731
        assert total(after) == total(before) + agreed
