"""align/plan.py: memory per GPU from the architecture, hand-computed cases, refusals, and the
estimate against measured CPU peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.cli import main as cli_main
from align.config import load_config
from align.configlib import ConfigError
from align.plan import (
    GiB,
    LLAMA2_7B,
    LLAMA2_70B,
    Arch,
    activation_bytes,
    arch_from_config,
    engine_memory,
    plan_config,
    training_memory,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = Arch(hidden=8, layers=2, heads=2, kv_heads=1, vocab=10, intermediate=16)


def test_parameter_counts_by_hand():
    # per layer: q 8x8 + k, v 2 x 8x4 + o 8x8 = 192; MLP 3 x 8x16 = 384; norms 2 x 8 = 16
    assert SMALL.layer_params() == 592
    assert SMALL.params() == 2 * 10 * 8 + 2 * 592 + 8  # untied embeddings + lm_head, final norm
    assert SMALL.lora_params(2, ("q_proj", "v_proj")) == 2 * (2 * (8 + 8) + 2 * (8 + 4))
    assert SMALL.kv_bytes_per_token(2) == 2 * 2 * 1 * 4 * 2
    # the published sizes: Llama-2-7B 6.74B, 70B 68.98B parameters
    assert round(LLAMA2_7B.params() / 1e9, 2) == 6.74
    assert round(LLAMA2_70B.params() / 1e9, 2) == 68.98
    # 70B has 8 kv heads: tp 16 replicates them, one per GPU
    assert LLAMA2_70B.kv_bytes_per_token(2, 16) == LLAMA2_70B.kv_bytes_per_token(2, 8)


def test_training_memory_by_hand():
    full = training_memory(SMALL, processes=1, micro_batch=1, seq_len=4, dtype_bytes=2, checkpointing=False)
    assert full["weights+grads+Adam"] == 16 * 1352
    # 4 tokens x 2 bytes x (10 h + 3 kv + 4 i = 80 + 12 + 64) x 2 layers + logits 4 x 10 x (2 + 8)
    assert full["activations"] == 4 * 2 * 156 * 2 + 400
    sharded = training_memory(SMALL, processes=2, micro_batch=1, seq_len=4, dtype_bytes=2, checkpointing=False)
    assert sharded["weights+grads+Adam"] == 16 * 1352 / 2
    assert sharded["ZeRO-3 gathered layers"] == 2 * 592 * 2
    lora = training_memory(
        SMALL,
        processes=2,
        micro_batch=1,
        seq_len=4,
        dtype_bytes=2,
        checkpointing=False,
        lora_r=2,
        lora_targets=("q_proj",),
    )
    assert lora["frozen weights"] == 2 * 1352 / 2 and lora["LoRA weights+grads+Adam"] == 16 * 64 / 2
    # checkpointing keeps each layer's input plus one layer's activations
    ckpt = activation_bytes(SMALL, 1, 4, 2, checkpointing=True, logits=False)
    assert ckpt == 4 * 2 * 8 * 2 + 4 * 2 * 156


def test_engine_memory_by_hand():
    e = engine_memory(LLAMA2_70B, 2, 8, 40 * GiB)
    assert e["engine weights"] == LLAMA2_70B.params() * 2 / 8
    assert e["engine KV cache"] == 40 * GiB - e["engine weights"] - e["engine reserve"]


def test_arch_from_config_reads_hf_keys(tmp_path):
    c = {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "intermediate_size": 1536,
        "tie_word_embeddings": True,
    }
    a = arch_from_config(c)
    assert a.params() == 134515008  # SmolLM2-135M, as torch counts it
    from align.configlib import ConfigError

    with pytest.raises(ConfigError, match="hidden_size"):
        arch_from_config({"num_hidden_layers": 2})


@pytest.mark.parametrize("name", ["llama2-7b.yaml", "llama2-70b.yaml"])
def test_recipe_configs_fit_80gb(name):
    cfg = load_config(ROOT / "configs" / name)
    _, _, dtype_bytes, plans = plan_config(cfg, 80.0)
    assert dtype_bytes == 2
    assert {p.name for p in plans} >= set(cfg.stages)
    for p in plans:
        assert p.refusal is None, p.refusal
        assert 0 < p.peak() <= 80 * GiB


def test_cli_prints_and_refuses(capsys):
    assert cli_main(["plan", str(ROOT / "configs" / "llama2-7b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ppo" in out and "FITS" in out and "DOES NOT FIT" not in out
    # full fine-tuning of 7B on one process: 16 bytes x 6.74B = 100 GiB
    code = cli_main(["plan", str(ROOT / "configs" / "llama2-7b.yaml"), "sft.train.num_processes=1"])
    err = capsys.readouterr().err
    assert code == 2 and "stage 'sft'" in err and "sft.train.num_processes" in err


def test_refusals_name_the_key():
    # 70B PPO with whole reward models (2 x 129 GiB on every GPU), then without activation checkpointing
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["ppo.reward.shard=false"])
    ppo = {p.name: p for p in plan_config(cfg)[3]}["ppo"]
    assert "reward models (2, whole)" in ppo.refusal and "ppo.reward.shard=true" in ppo.refusal
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["ppo.gradient_checkpointing=false"])
    ppo = {p.name: p for p in plan_config(cfg)[3]}["ppo"]
    assert "activations" in ppo.refusal and "ppo.gradient_checkpointing=true" in ppo.refusal
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["stages=[sft,rm_helpful,rm_safety,rejection_sampling]"])
    rs = {p.name: p for p in plan_config(cfg)[3]}["rejection_sampling"]
    assert "reward models (2, whole)" in rs.refusal and "only PPO shards them" in rs.refusal
    with pytest.raises(ConfigError, match="rollout.replicas=3: .* must divide ppo.num_processes=8"):
        load_config(ROOT / "configs" / "llama2-7b.yaml", ["rollout.replicas=3"])
    with pytest.raises(ConfigError, match="rollout.replicas=8: each colocated engine .* tensor_parallel_size=2"):
        load_config(ROOT / "configs" / "llama2-7b.yaml", ["rollout.replicas=8", "rollout.tensor_parallel_size=2"])
    cfg = load_config(ROOT / "configs" / "llama2-7b.yaml", ["rollout.replicas=1", "rollout.tensor_parallel_size=2"])
    assert {p.name: p for p in plan_config(cfg)[3]}["ppo"].refusal is None  # one engine may take 2 GPUs
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["rollout.tensor_parallel_size=3"])
    gatt = {p.name: p for p in plan_config(cfg)[3]}["gatt"]
    assert "rollout.tensor_parallel_size=3" in gatt.refusal
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["rollout.tensor_parallel_size=2"])
    gatt = {p.name: p for p in plan_config(cfg)[3]}["gatt"]  # 64 GiB of weights in a 40 GiB share
    assert "rollout.gpu_memory_utilization" in gatt.refusal
    cfg = load_config(ROOT / "configs" / "llama2-70b.yaml", ["sft.train.gradient_checkpointing=false"])
    sft = {p.name: p for p in plan_config(cfg)[3]}["sft"]
    assert "sft.train.gradient_checkpointing=true" in sft.refusal
    # full fine-tuning of 70B on one node: 16 bytes x 69B / 8 = 128 GiB a GPU
    cfg = load_config(
        ROOT / "configs" / "llama2-70b.yaml", ["sft.train.lora.enabled=false", "sft.train.num_processes=8"]
    )
    sft = {p.name: p for p in plan_config(cfg)[3]}["sft"]
    assert "sft.train.num_processes" in sft.refusal and "lora.enabled=true" in sft.refusal


@pytest.mark.slow
@pytest.mark.parametrize(
    "which, micro_batch, seq_len",
    # measured after a warm-up step of a throwaway model (plan_measure.py): torch's own code and pools are not counted
    [("tiny", 16, 256), ("embedded", 2, 128)],
)
def test_estimate_within_30_percent_of_measured_cpu_peak(which, micro_batch, seq_len):
    from align.models import embedded_model_dir, tiny_model_dir

    model_dir = tiny_model_dir() if which == "tiny" else embedded_model_dir()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "nice",
            "-n",
            "19",
            sys.executable,
            str(Path(__file__).with_name("plan_measure.py")),
            str(model_dir),
            str(micro_batch),
            str(seq_len),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    arch = arch_from_config(json.loads((model_dir / "config.json").read_text()))
    assert arch.params() == measured["params"]
    est = sum(
        training_memory(
            arch, processes=1, micro_batch=micro_batch, seq_len=seq_len, dtype_bytes=4, checkpointing=False
        ).values()
    )
    assert abs(est - measured["peak_bytes"]) <= 0.3 * measured["peak_bytes"], (est, measured)
