"""Concurrency against a live uvicorn server on 127.0.0.1: 20 labelers in 20 threads submit 500
labels in total, claiming free slots as they go; every label is stored once, none lost."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

N_THREADS, N_PAIRS, K = 20, 250, 2  # 250 pairs x 2 labels = 500 labels


@pytest.mark.timeout(600)
def test_20_threads_submit_500_labels_exactly_once(store, live_server, h, db):
    tokens = {f"l{i:02d}": store.add_labeler(f"l{i:02d}") for i in range(N_THREADS)}
    # No static assignment: every slot is claimed under contention through GET /api/pairs/next.
    store.create_round([h.pair(i) for i in range(N_PAIRS)], labels_per_pair=K, assign_to=[])
    submitted: dict[str, dict[int, dict]] = {name: {} for name in tokens}
    errors: list[str] = []
    start = threading.Barrier(N_THREADS)

    def work(name: str, token: str) -> None:
        headers = h.auth(token)
        try:
            with httpx.Client(base_url=live_server.url, headers=headers, timeout=120) as c:
                start.wait(timeout=60)
                for step in range(N_PAIRS + 10):  # bounded: a labeler can hold at most one slot per pair
                    res = c.get("/api/pairs/next")
                    res.raise_for_status()
                    pairs = res.json()["pairs"]
                    if not pairs:
                        return
                    pid = pairs[0]["id"]
                    body = {
                        "pair_id": pid,
                        "choice": "a" if (pid + len(name)) % 3 else "b",
                        "rating": ("better", "slightly_better")[step % 2],
                        "a_safe": True,
                        "b_safe": step % 2 == 0,
                    }
                    res = c.post("/api/labels", json=body)
                    res.raise_for_status()
                    if step % 5 == 0:  # resubmit: must not add a row
                        body["rating"] = "significantly_better"
                        c.post("/api/labels", json=body).raise_for_status()
                    submitted[name][pid] = body
                errors.append(f"{name}: did not run out of work")
        except Exception as e:  # surfaced by the assertion below
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=item) for item in tokens.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=540)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert not errors, errors

    sent = {(name, pid): body for name, d in submitted.items() for pid, body in d.items()}
    assert len(sent) == N_PAIRS * K == 500
    assert h.rows(db, "labels") == 500 and h.rows(db, "assignments") == 500
    stored = {}
    for p in store.round_pairs(1):
        labelers = [lab["labeler"] for lab in p["labels"]]
        assert len(labelers) == K and len(set(labelers)) == K, p["id"]  # two distinct labelers per pair
        for lab in p["labels"]:
            stored[(lab["labeler"], p["id"])] = lab
    assert set(stored) == set(sent)  # none lost, none extra
    for key, body in sent.items():
        lab = stored[key]
        assert (lab["choice"], lab["rating"], lab["a_safe"], lab["b_safe"]) == (
            body["choice"],
            body["rating"],
            body["a_safe"],
            body["b_safe"],
        )  # the latest submission
    per_labeler = Counter(name for name, _ in sent)
    assert sum(per_labeler.values()) == 500 and len(per_labeler) > 1
