"""The runner: skip finished stages, rerun changed ones and everything after, status, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import load_config
from align.pipeline import run_pipeline, stage_status, status_table

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = [
    "stages=[sft,rm_helpful,rm_safety]",
    "sft.train.max_steps=2",
    "rm_helpful.train.max_steps=2",
    "rm_safety.train.max_steps=2",
]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_validate_names_the_bad_key():
    res = _cli("validate", "configs/default.yaml", "foo.bar=1")
    assert res.returncode == 2
    assert "unknown key 'foo'" in res.stderr and "Traceback" not in res.stderr
    ok = _cli("validate", "configs/default.yaml")
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_bad_config_file_gets_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stages: [sft]\nsft:\n  datasets: [{format: alpaca, path: x}]\n  train: {batch_size: 10, micro_batch_size: 4}\n"
    )
    res = _cli("run", str(bad), f"run_dir={tmp_path}/run")
    assert res.returncode == 2
    assert "sft.train.batch_size=10" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


def test_missing_data_file_fails_before_anything_is_marked_done(tmp_path):
    res = _cli(
        "run",
        str(TINY),
        f"run_dir={tmp_path}/run",
        "stages=[sft]",
        "sft.datasets=[{format: alpaca, path: nowhere/missing.json}]",
    )
    assert res.returncode == 2
    assert "missing.json" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.slow
def test_rerun_skips_done_stages_and_reruns_changed_ones_downstream(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path}/run", *FAST])
    first = {m["stage"]: m for m in run_pipeline(cfg)}
    run_dir = Path(cfg.run_dir)
    assert all(stage_status(cfg, n, run_dir) == "done" for n in cfg.stages)
    # Same config: nothing reruns.
    again = {m["stage"]: m for m in run_pipeline(cfg)}
    assert all(again[n]["finished_at"] == first[n]["finished_at"] for n in cfg.stages)
    # A changed reward-model setting reruns that stage only; a changed SFT setting reruns everything after it.
    cfg2 = load_config(TINY, [f"run_dir={tmp_path}/run", *FAST, "rm_safety.margin=large"])
    assert [stage_status(cfg2, n, run_dir) for n in cfg2.stages] == ["done", "done", "stale"]
    cfg3 = load_config(TINY, [f"run_dir={tmp_path}/run", *FAST, "sft.max_length=200"])
    assert stage_status(cfg3, "sft", run_dir) == "stale"
    run_pipeline(cfg3)
    keys = {n: json.loads((run_dir / n / "manifest.json").read_text())["key"] for n in cfg3.stages}
    assert all(keys[n] != first[n]["key"] for n in cfg3.stages)
    text = status_table(cfg3)
    assert "sft" in text and "done" in text
    res = _cli("status", str(run_dir))
    assert res.returncode == 0 and "rm_safety" in res.stdout and "done" in res.stdout
