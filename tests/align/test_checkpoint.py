"""align/checkpoint.py: atomic writes (a checkpoint cut short is never resumed from), rotation, resume
lookup, and the RNG round trip of every generator."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from align.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _write_weights(value: float):
    def write(directory):
        torch.save({"w": torch.full((2,), value)}, directory / "weights.pt")

    return write


def test_save_then_resume_from_the_newest(tmp_path):
    assert latest_checkpoint(tmp_path / "none", "step") is None
    for step in (1, 2, 10):
        save_checkpoint(tmp_path, f"step-{step}", {"step": step}, _write_weights(step))
    # Numeric order, not text order: step-10 is newer than step-2.
    assert [p.name for p in list_checkpoints(tmp_path, "step")] == ["step-1", "step-2", "step-10"]
    newest = latest_checkpoint(tmp_path, "step")
    assert newest == tmp_path / "step-10"
    assert load_checkpoint(newest) == {"step": 10}
    assert torch.load(newest / "weights.pt")["w"].tolist() == [10.0, 10.0]
    assert list_checkpoints(tmp_path, "iter") == []  # another trainer's prefix


def test_rotation_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, f"iter-{step}", {"iteration": step}, _write_weights(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-4", "iter-5"]


def test_a_write_that_fails_leaves_no_checkpoint(tmp_path):
    save_checkpoint(tmp_path, "step-1", {"step": 1}, _write_weights(1))

    def broken(directory):
        (directory / "weights.pt").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "step-2", {"step": 2}, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    assert latest_checkpoint(tmp_path, "step") == tmp_path / "step-1"


def test_a_directory_without_state_json_is_not_complete(tmp_path):
    save_checkpoint(tmp_path, "step-1", {"step": 1}, _write_weights(1))
    (tmp_path / "step-2").mkdir()  # weights, no state.json: written by hand or by an older writer, cut short
    (tmp_path / "step-2" / "weights.pt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path, "step") == tmp_path / "step-1"


_KILLED_WRITER = """
import sys
from pathlib import Path
import torch
from align.checkpoint import save_checkpoint
root = Path(sys.argv[1])
save_checkpoint(root, "step-1", {"step": 1}, lambda d: torch.save({}, d / "w.pt"))
save_checkpoint(root, "step-2", {"step": 2}, lambda d: torch.save({}, d / "w.pt"), fault_point="ckpt_test")
"""


def test_a_process_killed_before_the_rename_leaves_the_previous_checkpoint(tmp_path):
    env = {**os.environ, "ALIGN_FAULT": "ckpt_test"}
    res = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, capture_output=True)
    assert res.returncode == -9, res.stderr.decode()[-2000:]
    # The second checkpoint was fully written, state.json included, in its temporary directory.
    [tmp] = [p for p in tmp_path.iterdir() if p.name.startswith(".step-2.tmp")]
    assert (tmp / "state.json").is_file()
    assert latest_checkpoint(tmp_path, "step") == tmp_path / "step-1"


def _draws() -> list[float]:
    out = [random.random(), float(np.random.rand()), torch.rand(1).item()]
    if torch.cuda.is_available():
        out.append(torch.rand(1, device="cuda").item())
    return out


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    save_checkpoint(tmp_path, "step-1", {"step": 1}, lambda d: None)
    expected = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    load_checkpoint(tmp_path / "step-1")
    assert _draws() == expected


def test_hf_trainer_checkpoints_are_found_by_their_trainer_state(tmp_path):
    """The SFT-style stages resume HF Trainer's `checkpoint-<N>` directories through the same lookup; one
    without `trainer_state.json` (written last) is a partial write and is passed over."""
    from align.sft import TRAINER_STATE

    for n, complete in ((2, True), (10, True), (12, False)):
        (tmp_path / f"checkpoint-{n}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{n}" / TRAINER_STATE).write_text("{}")
    assert latest_checkpoint(tmp_path, "checkpoint", state=TRAINER_STATE) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path, "checkpoint") is None  # no state.json: not align's own format
