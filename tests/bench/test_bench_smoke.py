"""Each benchmark in bench/ runs end to end on the tiny random model and writes its comparison.

`make test` runs no benchmark at full size (they take minutes, and tests never assert on time), so a
change to a function a benchmark calls could break it unseen (once `bench/sft.py` stopped with a
TypeError after `reference_records` gained an argument). These runs check that every benchmark still
starts, measures both sides and writes its JSON; they assert on the figures' presence and sanity,
never on their size. `bench/ppo.py` is not here: it builds its own SmolLM2 reward model and two
pipeline runs (minutes even at its smallest).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str, *args: str, timeout: int = 600) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"bench/{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert "precision: " in res.stdout and "bf16 units: " in res.stdout, "the CPU and the precision are printed"


def _hardware_recorded(r: dict) -> None:
    assert r["precision"]["name"] in ("bf16", "fp32") and r["precision"]["reason"]
    assert r["hardware"]["cpu"] and r["hardware"]["cpu_isa"]


@pytest.mark.slow
def test_sft_bench_compares_trl_and_ours(tmp_path, tiny_dir, shared_data):
    out = tmp_path / "sft.json"
    _bench("sft.py", "--steps", "1", "--samples", "8", "--model", str(tiny_dir), "--out", str(out))
    r = json.loads(out.read_text())
    assert r["trl_s_per_step"] > 0 and r["ours_s_per_step"] > 0
    assert r["speedup"] == pytest.approx(r["trl_s_per_step"] / r["ours_s_per_step"])
    # the same batches through both losses: the same loss
    assert r["loss_last_batch"]["ours"] == pytest.approx(r["loss_last_batch"]["trl"], rel=1e-2)
    assert 0 < r["answer_token_share"] < 1
    _hardware_recorded(r)


@pytest.mark.slow
def test_reward_bench_compares_trl_and_ours(tmp_path, tiny_dir, shared_data):
    out = tmp_path / "reward.json"
    _bench(
        "reward.py",
        "--train-pairs",
        "16",
        "--test-pairs",
        "8",
        "--batch",
        "4",
        "--max-length",
        "512",
        "--eager",
        "--freeze-layers",
        "1",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    for side in ("ours", "trl"):
        lo, hi = r[side]["heldout_ci"]
        assert r[side]["pairs_per_s"] > 0 and 0 <= lo <= r[side]["heldout_accuracy"] <= hi <= 1
    assert r["ours"]["train_pairs"] == 16 and 0 < r["trl"]["train_pairs"] <= 16
    _hardware_recorded(r)


@pytest.mark.slow
def test_rollout_bench_compares_vllm_and_transformers(tmp_path, tiny_dir, shared_data):
    out = tmp_path / "rollout.json"
    _bench(
        "rollout.py",
        "--model",
        str(tiny_dir),
        "--prompts",
        "4",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--kv-cache-gib",
        "0.5",
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert r["hf"]["tokens"] > 0 and r["vllm"]["tokens"] > 0
    assert r["vllm_over_hf"] == pytest.approx(r["vllm"]["tokens_per_s"] / r["hf"]["tokens_per_s"])
    assert math.isfinite(r["update_weights_plain_s"]) and math.isfinite(r["update_weights_lora_s"])
    assert r["model"] == str(tiny_dir)
    _hardware_recorded(r)
