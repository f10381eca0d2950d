"""Fixtures of the labeling tests: a file-backed store, tokens, an in-process client and a live server."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from align.label.store import LabelStore


def pair(i: int = 0, category: str = "helpfulness") -> dict:
    """A valid pair for `LabelStore.create_round`."""
    return {
        "prompt": [{"role": "user", "content": f"Question {i}: what is a kite?"}],
        "response_a": f"A kite is a tethered aircraft ({i}).",
        "response_b": f"no idea {i}",
        "settings_a": {"temperature": 0.7},
        "settings_b": {"temperature": 1.2},
        "category": category,
    }


def rows(db: Path, table: str) -> int:
    """Row count read with plain sqlite3 (not through the store under test)."""
    con = sqlite3.connect(str(db))
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def all_counts(db: Path) -> dict:
    return {t: rows(db, t) for t in ("rounds", "pairs", "labelers", "assignments", "labels")}


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "labels.db"


@pytest.fixture
def store(db):
    s = LabelStore.open(db)
    yield s
    s.close()


@pytest.fixture
def tokens(store) -> dict:
    """Tokens of an admin ('root') and two labelers ('ann', 'bob')."""
    return {
        "root": store.add_labeler("root", admin=True),
        "ann": store.add_labeler("ann"),
        "bob": store.add_labeler("bob"),
    }


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def h():
    """Helpers: h.pair(i, category), h.rows(db, table), h.counts(db), h.auth(token)."""
    return SimpleNamespace(pair=pair, rows=rows, counts=all_counts, auth=auth)


@pytest.fixture
def client(store):
    from fastapi.testclient import TestClient

    from align.label.server import create_app

    with TestClient(create_app(store)) as c:
        yield c


class LiveServer:
    """uvicorn serving an app on a free port of 127.0.0.1, in a thread; `stop()` ends it."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free port, held by this socket
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop within 30 s"


@pytest.fixture
def live_server(store):
    from align.label.server import create_app

    server = LiveServer(create_app(store))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rm_dirs(tmp_path_factory, tiny_dir):
    """Two tiny reward models (random score heads of different seeds) saved as RM directories, each
    scoring 128 tokens (its scorer.json)."""
    import torch

    from align.models import load_tokenizer
    from reward.model import ScorerSettings, chat_template_sha, load_reward_model, save_reward_model

    tok = load_tokenizer(tiny_dir)
    out = []
    for seed, name in ((1, "rm_helpful"), (2, "rm_safety")):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(name)
        save_reward_model(
            load_reward_model(tiny_dir, tok),
            tok,
            path,
            ScorerSettings(max_length=128, chat_template_sha=chat_template_sha(tok)),
        )
        out.append(path)
    return out
