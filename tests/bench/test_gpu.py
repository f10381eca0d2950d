"""bench/gpu.py (through scripts/gpu_check.sh) in its CPU dry mode: the device check's code keeps
working on machines without a GPU. Asserts the figures are there and sane, never their size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_mode(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--dry", "--prompts", "4", "--n", "2", "--max-new-tokens", "8", "--run-dir", str(tmp_path / "run")]
    res = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), *args, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["precision"] == "fp32"
    assert set(r["stages_s"]) == {"sft"} and r["stages_s"]["sft"] > 0
    assert r["vllm_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0 and r["tokens"] > 0
    assert r["weight_sync_s"] > 0
    assert "weight sync" in res.stdout
