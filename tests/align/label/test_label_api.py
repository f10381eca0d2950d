"""The JSON API: happy path, 401 / 403 / 404 / 409 / 422, nothing written on any error,
idempotent resubmission and per-labeler isolation (in process, through Starlette's TestClient)."""

from __future__ import annotations

import json
import re

import pytest

PAIR = {
    "prompt": [{"role": "user", "content": "What is a kite?"}],
    "response_a": "A tethered aircraft.",
    "response_b": "No idea.",
}
GOOD = {"choice": "a", "rating": "better", "a_safe": True, "b_safe": True}


def _round(client, h, tokens, n=2, **extra):
    body = {"labels_per_pair": 1, "pairs": [dict(PAIR, response_b=f"No idea {i}.") for i in range(n)], **extra}
    res = client.post("/api/admin/rounds", headers=h.auth(tokens["root"]), json=body)
    assert res.status_code == 201, res.text
    return res.json()["round"]


def test_happy_path_label_progress_and_export(client, store, tokens, h, db):
    assert _round(client, h, tokens, n=4) == 1  # 4 pairs, round-robin over ann and bob
    ann = h.auth(tokens["ann"])
    assert client.get("/api/me", headers=ann).json() == {"name": "ann", "admin": False}
    got = client.get("/api/pairs/next", headers=ann).json()
    assert got["progress"] == {"labeled": 0, "assigned": 2, "available": 0}
    (p,) = got["pairs"]
    assert set(p) == {"id", "round", "prompt", "response_a", "response_b", "category", "html"}  # blind: no settings
    res = client.post("/api/labels", headers=ann, json={"pair_id": p["id"], **GOOD})
    assert res.status_code == 200 and res.json()["labeler"] == "ann" and res.json()["revision"] == 1
    assert client.get("/api/progress", headers=ann).json()["labeled"] == 1
    (p2,) = client.get("/api/pairs/next", headers=ann).json()["pairs"]
    assert p2["id"] != p["id"]
    client.post("/api/labels", headers=ann, json={"pair_id": p2["id"], "choice": "tie", "a_safe": True, "b_safe": True})
    assert client.get("/api/pairs/next", headers=ann).json()["pairs"] == []
    mine = client.get("/api/labels", headers=ann).json()["labels"]
    assert [(x["pair_id"], x["choice"]) for x in mine] == [(p["id"], "a"), (p2["id"], "tie")]
    assert client.get(f"/api/labels/{mine[0]['id']}", headers=ann).json() == mine[0]

    rounds = client.get("/api/admin/rounds", headers=h.auth(tokens["root"])).json()["rounds"]
    assert (rounds[0]["pairs"], rounds[0]["labels"]) == (4, 2)
    exp = client.get("/api/admin/rounds/1/export", headers=h.auth(tokens["root"])).json()
    assert exp["stats"]["label/kept"] == 1 and exp["stats"]["label/dropped/tie"] == 1
    assert exp["records"][0]["chosen"] == p["response_a"] and exp["records"][0]["source"] == "label:round-1"
    kept_tie = client.get("/api/admin/rounds/1/export?ties=negligible", headers=h.auth(tokens["root"])).json()
    assert kept_tie["stats"]["label/kept"] == 2

    res = client.post("/api/admin/labelers", headers=h.auth(tokens["root"]), json={"name": "cy"})
    assert res.status_code == 201 and store.authenticate(res.json()["token"]).name == "cy"


def test_the_page_is_self_contained_and_shows_the_shortcuts(client):
    res = client.get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    html = res.text
    assert "<script src" not in html and "<link" not in html and "cdn" not in html.lower()
    assert "http://" not in html and "https://" not in html
    for key in ("<kbd>1</kbd>", "<kbd>2</kbd>", "<kbd>q</kbd>", "<kbd>r</kbd>", "<kbd>s</kbd>", "<kbd>Enter</kbd>"):
        assert key in html
    assert "<kbd>u</kbd>" in html and "sessionStorage" in html
    # Markup enters the page only from the server's renderer (align/label/markdown.py); all else is textContent.
    sources = re.findall(r"innerHTML = ([^;]+);", html)
    assert len(sources) == 3 and all(src.startswith("p.html.") for src in sources), sources


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer "}]
)
def test_missing_or_bad_token_is_401_before_anything_else(client, tokens, h, db, headers):
    _round(client, h, tokens)
    before = h.counts(db)
    for method, path, body in [
        ("GET", "/api/me", None),
        ("GET", "/api/pairs/next", None),
        ("POST", "/api/labels", {"pair_id": 1, **GOOD}),
        ("POST", "/api/labels", {"broken": True}),  # would be 422 with a token
        ("GET", "/api/labels/1", None),
        ("GET", "/api/admin/rounds", None),
        ("POST", "/api/admin/rounds", {"pairs": [PAIR]}),
        ("GET", "/api/no/such/route", None),
    ]:
        res = client.request(method, path, headers=headers, json=body)
        assert res.status_code == 401, (method, path, res.text)
        assert res.headers["www-authenticate"] == "Bearer"
    res = client.post("/api/labels", headers={**headers, "Content-Type": "application/json"}, content=b"{not json")
    assert res.status_code == 401
    assert h.counts(db) == before


def test_403_admin_routes_other_labels_and_unassigned_pairs(client, tokens, h, db):
    _round(client, h, tokens, n=2)
    ann, bob = h.auth(tokens["ann"]), h.auth(tokens["bob"])
    (p,) = client.get("/api/pairs/next", headers=ann).json()["pairs"]
    label = client.post("/api/labels", headers=ann, json={"pair_id": p["id"], **GOOD}).json()
    before = h.counts(db)
    for method, path, body in [
        ("POST", "/api/admin/rounds", {"pairs": [PAIR]}),
        ("GET", "/api/admin/rounds", None),
        ("GET", "/api/admin/rounds/1/export", None),
        ("POST", "/api/admin/labelers", {"name": "mallory", "admin": True}),
    ]:
        assert client.request(method, path, headers=bob, json=body).status_code == 403, path
    assert client.get(f"/api/labels/{label['id']}", headers=bob).status_code == 403
    # bob overwriting ann's label of ann's pair: the pair is not assigned to him.
    res = client.post(
        "/api/labels",
        headers=bob,
        json={"pair_id": p["id"], "choice": "b", "rating": "better", "a_safe": False, "b_safe": False},
    )
    assert res.status_code == 403
    assert h.counts(db) == before
    assert client.get(f"/api/labels/{label['id']}", headers=ann).json()["choice"] == "a"  # untouched
    assert client.get(f"/api/labels/{label['id']}", headers=h.auth(tokens["root"])).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"pair_id": 1, "choice": "maybe", "rating": "better", "a_safe": True, "b_safe": True},
        {"pair_id": 1, "choice": "a", "a_safe": True, "b_safe": True},  # no rating
        {"pair_id": 1, "choice": "a", "rating": "great", "a_safe": True, "b_safe": True},
        {"pair_id": 1, "choice": "tie", "rating": "better", "a_safe": True, "b_safe": True},  # a tie has no rating
        {"pair_id": 1, "choice": "b", "rating": "better", "a_safe": "yes", "b_safe": True},
        {"pair_id": 1, "choice": "b", "rating": "better", "b_safe": True},  # a_safe missing
        {"pair_id": "1", "choice": "a", "rating": "better", "a_safe": True, "b_safe": True},
        {"pair_id": 1, "choice": "a", "rating": "better", "a_safe": True, "b_safe": True, "note": "extra"},
        {},
        [],
        "a",
    ],
)
def test_malformed_label_is_422_and_writes_nothing(client, tokens, h, db, body):
    _round(client, h, tokens)
    ann = h.auth(tokens["ann"])
    client.get("/api/pairs/next", headers=ann)
    before = h.counts(db)
    assert client.post("/api/labels", headers=ann, json=body).status_code == 422
    assert h.counts(db) == before


def test_malformed_json_query_and_round_bodies_are_422(client, tokens, h, db):
    _round(client, h, tokens)
    before = h.counts(db)
    ann, root = h.auth(tokens["ann"]), h.auth(tokens["root"])
    assert (
        client.post("/api/labels", headers={**ann, "Content-Type": "application/json"}, content=b"{bad").status_code
        == 422
    )
    assert client.get("/api/pairs/next?limit=0", headers=ann).status_code == 422
    assert client.get("/api/pairs/next?limit=x", headers=ann).status_code == 422
    for body in [
        {"pairs": []},
        {"pairs": [dict(PAIR, response_b=PAIR["response_a"])]},
        {"pairs": [dict(PAIR, prompt=[])]},
        {"pairs": [dict(PAIR, prompt=[{"role": "bot", "content": "x"}])]},
        {"pairs": [dict(PAIR, category="fun")]},
        {"pairs": [PAIR], "labels_per_pair": 0},
        {"pairs": [PAIR, dict(PAIR, response_a="")]},
        {"pairs": [PAIR], "extra": 1},
    ]:
        assert client.post("/api/admin/rounds", headers=root, json=body).status_code == 422, body
    assert client.post("/api/admin/labelers", headers=root, json={"name": "no spaces"}).status_code == 422
    assert h.counts(db) == before


def test_404_and_409_write_nothing(client, tokens, h, db):
    _round(client, h, tokens)
    before = h.counts(db)
    ann, root = h.auth(tokens["ann"]), h.auth(tokens["root"])
    assert client.post("/api/labels", headers=ann, json={"pair_id": 999, **GOOD}).status_code == 404
    assert client.get("/api/labels/999", headers=ann).status_code == 404
    assert client.get("/api/pairs/next?round=7", headers=ann).status_code == 404
    assert client.get("/api/admin/rounds/7/export", headers=root).status_code == 404
    assert client.post("/api/admin/rounds", headers=root, json={"round": 1, "pairs": [PAIR]}).status_code == 409
    assert (
        client.post("/api/admin/rounds", headers=root, json={"pairs": [PAIR], "assign_to": ["ghost"]}).status_code
        == 404
    )
    assert client.post("/api/admin/labelers", headers=root, json={"name": "ann"}).status_code == 409
    assert h.counts(db) == before


def test_resubmitting_is_idempotent_and_the_latest_wins(client, tokens, h, db):
    _round(client, h, tokens, n=2)
    ann = h.auth(tokens["ann"])
    (p,) = client.get("/api/pairs/next", headers=ann).json()["pairs"]
    body = {"pair_id": p["id"], **GOOD}
    first = client.post("/api/labels", headers=ann, json=body).json()
    again = client.post("/api/labels", headers=ann, json=body).json()
    assert h.rows(db, "labels") == 1 and again["id"] == first["id"] and again["revision"] == 2
    changed = client.post("/api/labels", headers=ann, json={**body, "choice": "b", "rating": "slightly_better"}).json()
    assert h.rows(db, "labels") == 1 and (changed["choice"], changed["rating"]) == ("b", "slightly_better")
    assert [x["choice"] for x in client.get("/api/labels", headers=ann).json()["labels"]] == ["b"]


def test_labelers_see_only_their_own_work(client, tokens, h):
    _round(client, h, tokens, n=4)
    ann, bob = h.auth(tokens["ann"]), h.auth(tokens["bob"])
    ann_pairs = client.get("/api/pairs/next?limit=10", headers=ann).json()["pairs"]
    bob_pairs = client.get("/api/pairs/next?limit=10", headers=bob).json()["pairs"]
    assert len(ann_pairs) == len(bob_pairs) == 2
    assert not {p["id"] for p in ann_pairs} & {p["id"] for p in bob_pairs}
    for p in ann_pairs:
        client.post("/api/labels", headers=ann, json={"pair_id": p["id"], **GOOD})
    assert client.get("/api/labels", headers=bob).json()["labels"] == []
    assert {x["labeler"] for x in client.get("/api/labels", headers=ann).json()["labels"]} == {"ann"}
    assert client.get("/api/progress", headers=bob).json() == {"labeled": 0, "assigned": 2, "available": 0}


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN", b"Infinity"])
def test_non_finite_numbers_in_any_body_are_422_and_write_nothing(client, tokens, h, db, number):
    """JSON numbers that parse to inf or NaN: FastAPI's default handler echoed them and failed with 500."""
    _round(client, h, tokens)
    ann, root = h.auth(tokens["ann"]), h.auth(tokens["root"])
    client.get("/api/pairs/next", headers=ann)
    before = h.counts(db)
    pair = json.dumps(PAIR).encode()
    bodies = [
        ("/api/labels", ann, b'{"pair_id": %s, "choice": "skip"}' % number),
        ("/api/labels", ann, b'{"pair_id": 1, "choice": "a", "rating": %s, "a_safe": true, "b_safe": true}' % number),
        ("/api/admin/rounds", root, b'{"pairs": [%s], "labels_per_pair": %s}' % (pair, number)),
        ("/api/admin/rounds", root, b'{"pairs": [%s], "round": %s}' % (pair, number)),
        ("/api/admin/labelers", root, b'{"name": %s}' % number),
    ]
    for path, auth, body in bodies:
        res = client.post(path, headers={**auth, "Content-Type": "application/json"}, content=body)
        assert res.status_code == 422, (path, body, res.status_code, res.text)
        assert res.json()["detail"][0]["loc"]  # says where
    assert h.counts(db) == before


def test_pairs_come_with_safe_html(client, store, tokens, h):
    p = {**h.pair(0), "response_a": "Use `ls`:\n```sh\nls -la\n```\n<script>alert(1)</script>"}
    p["prompt"] = [{"role": "system", "content": "Be **brief**."}, *p["prompt"]]
    store.create_round([p], assign_to=["ann"])
    (got,) = client.get("/api/pairs/next", headers=h.auth(tokens["ann"])).json()["pairs"]
    assert got["html"]["prompt"][0] == "<p>Be <strong>brief</strong>.</p>"
    assert got["html"]["response_a"] == (
        "<p>Use <code>ls</code>:</p><pre><code>ls -la</code></pre><p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    )
    assert got["response_a"] == p["response_a"]  # the raw text is still there, unchanged


def test_undo_over_the_api(client, store, tokens, h, db):
    store.create_round([h.pair(i) for i in range(2)], assign_to=["ann", "bob"], labels_per_pair=2)
    ann, bob = h.auth(tokens["ann"]), h.auth(tokens["bob"])
    assert client.post("/api/labels/undo", headers=ann).status_code == 404  # nothing to undo yet
    assert client.post("/api/labels/undo").status_code == 401
    ids = [p["id"] for p in store.round_pairs(1)]
    for token, pid in ((ann, ids[0]), (ann, ids[1]), (bob, ids[0])):
        body = {"pair_id": pid, "choice": "b", "rating": "better", "a_safe": True, "b_safe": True}
        assert client.post("/api/labels", headers=token, json=body).status_code == 200
    res = client.post("/api/labels/undo", headers=ann)
    assert res.status_code == 200, res.text
    data = res.json()
    assert data["label"]["pair_id"] == ids[1] and data["pair"]["id"] == ids[1] and "html" in data["pair"]
    assert data["progress"] == {"labeled": 1, "assigned": 2, "available": 0}
    assert h.rows(db, "labels") == 2  # ann's first label and bob's stay
    assert client.get("/api/pairs/next", headers=ann).json()["pairs"][0]["id"] == ids[1]


def test_admin_quality_and_admin_page(client, store, tokens, h):
    store.create_round([h.pair(0)], assign_to=["ann"], gold=[{**h.pair(1), "answer": "a"}])
    for pid in [p["id"] for p in store.round_pairs(1)]:
        body = {"pair_id": pid, "choice": "a", "rating": "better", "a_safe": True, "b_safe": True}
        assert client.post("/api/labels", headers=h.auth(tokens["ann"]), json=body).status_code == 200
    assert client.get("/api/admin/quality", headers=h.auth(tokens["ann"])).status_code == 403
    (r,) = client.get("/api/admin/quality", headers=h.auth(tokens["root"])).json()["rounds"]
    assert (r["pairs"], r["gold_pairs"], r["complete_pairs"], r["closed"]) == (1, 1, 1, False)
    assert r["agreement"]["gold_accuracy"] == 1.0 and r["agreement"]["labelers"]["ann"]["gold_labels"] == 1
    page = client.get("/admin")
    assert page.status_code == 200 and "/api/admin/quality" in page.text and "Content-Security-Policy" in page.headers
    assert "innerHTML" not in page.text  # the admin view writes text only
