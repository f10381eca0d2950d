"""`align label ...` through its register/dispatch pair (what align/cli.py wires in)."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from align.errors import AlignError
from align.label.cli import dispatch, register
from align.label.export import load_export

ROOT = Path(__file__).resolve().parents[3]
YAML = """
seed: 0
stages: [sft]
precision: fp32
model: {source: tiny}
rollout: {engine: transformers, threads: 1, max_model_len: 512}
sft: {datasets: [{format: synthetic_sft}]}
label:
  init: base
  prompts: [{format: synthetic_prompts, limit: 4}]
  sampling_a: {temperature: 0.7, max_new_tokens: 6}
  sampling_b: {temperature: 1.3, max_new_tokens: 6}
"""


def _run(*argv) -> int:
    p = argparse.ArgumentParser(prog="align")
    register(p.add_subparsers(dest="cmd", required=True))
    return dispatch(p.parse_args(["label", *argv]))


def test_add_labeler_prints_the_token_once_and_stores_its_hash(tmp_path, capsys):
    db = tmp_path / "l.db"
    assert _run("add-labeler", "ann", "--db", str(db)) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert _run("add-labeler", "root", "--admin", "--db", str(db)) == 0
    con = sqlite3.connect(str(db))
    stored = dict(con.execute("SELECT name, token_hash FROM labelers").fetchall())
    admins = dict(con.execute("SELECT name, is_admin FROM labelers").fetchall())
    con.close()
    assert stored["ann"] == hashlib.sha256(token.encode()).hexdigest() and admins == {"ann": 0, "root": 1}
    with pytest.raises(AlignError, match="exists"):
        _run("add-labeler", "ann", "--db", str(db))


def test_generate_auto_export_status(tmp_path, capsys):
    db, cfg = tmp_path / "l.db", tmp_path / "exp.yaml"
    cfg.write_text(YAML)
    assert _run("status", "--db", str(db)) == 0 and "no rounds yet" in capsys.readouterr().out
    assert _run("generate", str(cfg), "label.labels_per_pair=2", "--db", str(db), "--assign-to", "") == 0
    assert "round 1:" in capsys.readouterr().out
    assert _run("auto", "--db", str(db), "--round", "1", "--judge", "rules", "--labelers", "2") == 0
    assert "labeled" in capsys.readouterr().out
    out = tmp_path / "export"
    assert _run("export", "--db", str(db), "--round", "1", "--out", str(out), "--ties", "negligible") == 0
    assert len(load_export(out, cache_dir=tmp_path / "hf")) > 0
    assert _run("status", "--db", str(db)) == 0
    out_lines = capsys.readouterr().out.strip().splitlines()
    line, quality, *per_labeler = out_lines[next(i for i, x in enumerate(out_lines) if " pairs complete " in x) :]
    assert line.startswith("round 1:") and "x 2 labels" in line
    assert "agreement with the majority" in quality and "kappa" in quality  # two auto labelers: Cohen's
    assert [x.split(":")[0].strip() for x in per_labeler] == ["auto-1", "auto-2"]
    with pytest.raises(AlignError, match="no round 9"):
        _run("export", "--db", str(db), "--round", "9", "--out", str(out))
    with pytest.raises(AlignError, match="reward models"):
        _run("auto", "--db", str(db), "--round", "1", "--judge", "reward")


def test_serve_answers_on_the_port_it_was_given(tmp_path):
    import socket

    db = tmp_path / "l.db"
    from align.label.store import LabelStore

    store = LabelStore.open(db)
    token = store.add_labeler("ann")
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import argparse, sys; from align.label.cli import register, dispatch; p = argparse.ArgumentParser(); "
        "register(p.add_subparsers(dest='cmd')); sys.exit(dispatch(p.parse_args(sys.argv[1:])))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "label", "serve", "--db", str(db), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(
                    f"http://127.0.0.1:{port}/api/me", headers={"Authorization": f"Bearer {token}"}
                ).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert status == {"name": "ann", "admin": False}
        assert httpx.get(f"http://127.0.0.1:{port}/api/me").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
