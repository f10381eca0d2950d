"""Ctrl-C during a 2-process (accelerate + ZeRO-3) stage leaves no child process and a resumable run."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from align.config import load_config
from align.pipeline import stage_status

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_leaves_a_resumable_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "stage",
        "sft",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        "sft.train.num_processes=2",
        "sft.train.max_steps=400",
        "sft.train.save_steps=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    me = psutil.Process(proc.pid)
    deadline, family = time.time() + 600, []
    ckpts = run_dir / ".work" / "sft" / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        family = me.children(recursive=True)
        if len(family) >= 3 and any((p / "trainer_state.json").is_file() for p in ckpts.glob("checkpoint-*")):
            break  # launcher + 2 ranks, training under way
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "rerun the same command to resume" in out
    time.sleep(1)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline()[:4] for p in alive]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", args[3:])
    assert stage_status(cfg, "sft", run_dir) == "partial"
