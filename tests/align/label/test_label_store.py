"""The labeling store: token hashes, assignment, upsert, isolation, and consistency after failures."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from align.label.store import Conflict, Forbidden, InvalidInput, LabelStore, NotFound

ROOT = Path(__file__).resolve().parents[3]


def test_sqlite_file_uses_wal_and_foreign_keys(store, db):
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_only_the_token_hash_is_stored(store, db):
    token = store.add_labeler("ann")
    con = sqlite3.connect(str(db))
    name, stored = con.execute("SELECT name, token_hash FROM labelers").fetchone()
    con.close()
    assert name == "ann" and stored == hashlib.sha256(token.encode()).hexdigest()
    assert token.encode() not in db.read_bytes() + (
        Path(str(db) + "-wal").read_bytes() if Path(str(db) + "-wal").exists() else b""
    )
    assert store.authenticate(token).name == "ann"
    assert store.authenticate("not-a-token") is None and store.authenticate("") is None
    with pytest.raises(Conflict):
        store.add_labeler("ann")
    with pytest.raises(InvalidInput):
        store.add_labeler("bad name!")
    new = store.reset_token("ann")
    assert store.authenticate(token) is None and store.authenticate(new).name == "ann"


def test_round_robin_assignment_gives_each_pair_k_distinct_labelers(store, h):
    for name in ("l1", "l2", "l3"):
        store.add_labeler(name)
    store.add_labeler("root", admin=True)  # admins are not in the default pool
    number = store.create_round([h.pair(i) for i in range(6)], labels_per_pair=2)
    assert number == 1
    per_pair, load = Counter(), Counter()
    with store.engine.connect() as conn:
        got = conn.exec_driver_sql(
            "SELECT a.pair_id, l.name FROM assignments a JOIN labelers l ON l.id = a.labeler_id"
        ).all()
    for pid, name in got:
        per_pair[pid] += 1
        load[name] += 1
    assert set(per_pair.values()) == {2} and len(per_pair) == 6
    assert len({(pid, name) for pid, name in got}) == 12  # distinct labelers per pair
    assert dict(load) == {"l1": 4, "l2": 4, "l3": 4}  # 6 pairs x 2 / 3 labelers


def test_next_pairs_gives_assigned_work_then_claims_free_slots(store, h):
    ann = store.authenticate(store.add_labeler("ann"))
    bob = store.authenticate(store.add_labeler("bob"))
    store.create_round([h.pair(i) for i in range(3)], labels_per_pair=1, assign_to=["ann"])
    store.create_round([h.pair(i) for i in range(2)], labels_per_pair=1, assign_to=[])
    # ann: her 3 assigned pairs of round 1 first, then she claims round 2's free slots.
    first = store.next_pairs(ann.id, limit=10)
    assert [(p["round"], p["id"]) for p in first] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert store.next_pairs(bob.id, limit=10) == []  # every slot is taken: nothing for bob
    # Asking again returns the same pending pairs (no new claims).
    assert [p["id"] for p in store.next_pairs(ann.id, limit=10)] == [1, 2, 3, 4, 5]
    assert store.progress(ann.id) == {"labeled": 0, "assigned": 5, "available": 0}


def test_a_skip_releases_the_slot_to_another_labeler(store, h):
    ann = store.authenticate(store.add_labeler("ann"))
    bob = store.authenticate(store.add_labeler("bob"))
    store.create_round([h.pair(0)], labels_per_pair=1, assign_to=["ann"])
    assert store.next_pairs(bob.id) == []
    store.submit_label(ann.id, 1, "skip")
    assert [p["id"] for p in store.next_pairs(bob.id)] == [1]
    assert store.progress(bob.id)["assigned"] == 1


def test_resubmission_keeps_one_label_the_latest(store, db, h):
    ann = store.authenticate(store.add_labeler("ann"))
    store.create_round([h.pair(0)], labels_per_pair=1)
    first = store.submit_label(ann.id, 1, "a", "better", True, False)
    second = store.submit_label(ann.id, 1, "b", "slightly_better", False, True)
    assert h.rows(db, "labels") == 1
    assert second["id"] == first["id"] and second["revision"] == 2
    assert (second["choice"], second["rating"], second["a_safe"], second["b_safe"]) == (
        "b",
        "slightly_better",
        False,
        True,
    )
    assert second["created_at"] == first["created_at"] and second["updated_at"] >= first["updated_at"]
    assert store.labels_of(ann.id) == [second]


def test_labels_need_an_assignment_and_valid_fields(store, db, h):
    ann = store.authenticate(store.add_labeler("ann"))
    bob = store.authenticate(store.add_labeler("bob"))
    store.create_round([h.pair(0)], labels_per_pair=1, assign_to=["ann"])
    before = h.counts(db)
    with pytest.raises(Forbidden):
        store.submit_label(bob.id, 1, "a", "better", True, True)
    with pytest.raises(NotFound):
        store.submit_label(ann.id, 99, "a", "better", True, True)
    for bad in [
        ("a", None, True, True),
        ("tie", "better", True, True),
        ("b", "great", True, True),
        ("a", "better", None, True),
        ("yes", None, True, True),
        ("a", "better", "yes", True),
    ]:
        with pytest.raises(InvalidInput):
            store.submit_label(ann.id, 1, *bad)
    assert h.counts(db) == before
    store.submit_label(ann.id, 1, "skip")  # skip: no rating, safety flags optional
    with pytest.raises(Forbidden):
        store.get_label(1, bob)
    assert store.get_label(1, ann)["choice"] == "skip"


def test_create_round_checks_pairs_and_numbers(store, db, h):
    store.create_round([h.pair(0)], number=3)
    assert store.create_round([h.pair(1)]) == 4  # one after the highest
    with pytest.raises(Conflict):
        store.create_round([h.pair(2)], number=3)
    bad = [
        dict(h.pair(0), response_b=h.pair(0)["response_a"]),
        dict(h.pair(0), prompt=[{"role": "assistant", "content": "hi"}]),
        dict(h.pair(0), response_a="   "),
        dict(h.pair(0), category="fun"),
    ]
    for b in bad:
        with pytest.raises(InvalidInput):
            store.create_round([h.pair(5), b])
    with pytest.raises(NotFound):
        store.create_round([h.pair(0)], assign_to=["nobody"])
    assert h.counts(db)["pairs"] == 2


def test_an_error_inside_the_transaction_leaves_nothing(store, db, h):
    store.add_labeler("ann")
    before = h.counts(db)
    # The 3rd pair's settings cannot be stored as JSON: the round row and two pairs (and their
    # assignments) are already flushed inside the transaction when it fails.
    pairs = [h.pair(0), h.pair(1), dict(h.pair(2), settings_a={"x": object()}), h.pair(3)]
    with pytest.raises(Exception):
        store.create_round(pairs, labels_per_pair=1)
    assert h.counts(db) == before
    assert store.create_round([h.pair(0)]) == 1  # the store still works, and round 1 was never taken


WRITER = textwrap.dedent("""
    import sys
    from align.label.store import LabelStore
    store = LabelStore.open(sys.argv[1])
    store.add_labeler("w")
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "response_a": f"a{i}", "response_b": f"b{i}"}
             for i in range(int(sys.argv[2]))]
    for k in range(1, 1000):
        print(f"begin {k}", flush=True)
        store.create_round(pairs, labels_per_pair=1)
        print(f"done {k}", flush=True)
""")


def test_a_writer_killed_mid_batch_leaves_only_whole_rounds(tmp_path, h):
    db = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n = 1500
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(n)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until round 1 is committed and round 2 has begun
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "begin 2":
                break
        assert "done 1" in lines, f"writer did not commit a round: {lines}"
        time.sleep(0.3)  # a round of 1500 pairs takes longer than this: the kill lands inside it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines += [ln.strip() for ln in proc.stdout.read().splitlines()]
    proc.stdout.close()
    done = {int(ln.split()[1]) for ln in lines if ln.startswith("done")}
    begun = {int(ln.split()[1]) for ln in lines if ln.startswith("begin")}
    assert begun - done, f"the writer was not killed mid-round: {lines}"

    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    per_round = dict(
        con.execute(
            "SELECT r.number, count(p.id) FROM rounds r LEFT JOIN pairs p ON p.round_id = r.id GROUP BY r.number"
        ).fetchall()
    )
    assigned = con.execute("SELECT count(*) FROM assignments").fetchone()[0]
    con.close()
    assert set(per_round) == done and all(v == n for v in per_round.values())
    assert assigned == n * len(done)
    # The store opens and writes after the crash.
    store = LabelStore.open(db)
    assert store.create_round([h.pair(0)]) == max(done) + 1
    store.close()
