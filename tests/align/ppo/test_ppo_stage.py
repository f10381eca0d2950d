"""The ppo stage on the tiny config: a 1-process run, resume after a crash, a 2-process ZeRO-3 run, and
the 2-process update against the 1-process one on the same batch."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.io import read_metrics

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.yaml"
WORKER = Path(__file__).with_name("ppo_update_worker.py")
# Few steps: PPO needs a policy and two reward models to exist, not to be good. One engine thread: on a
# machine shared with other jobs, two OpenMP threads waiting on each other are many times slower.
BASE_OVERRIDES = [
    "sft.train.max_steps=2",
    "rm_helpful.train.max_steps=2",
    "rm_safety.train.max_steps=2",
    "rollout.threads=1",
]
PPO_STAGES = "stages=[sft,rm_helpful,rm_safety,ppo]"
STANDARD = [
    "ppo/approx_kl",
    "ppo/clipfrac",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/explained_variance",
    "ppo/entropy",
    "reward/combined_mean",
    "reward/helpful_mean",
    "reward/safety_mean",
    "reward/safety_share",
    "kl/ref_mean",
    "rollout/response_length",
    "rollout/tokens_per_s",
    "rollout/logprob_gap",
    "time/generate_s",
    "time/score_s",
    "time/train_s",
    "time/sync_s",
]
# What two runs that saw the same samples must agree on
COMPARED = [
    "reward/combined_mean",
    "reward/helpful_mean",
    "reward/safety_mean",
    "kl/ref_mean",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/approx_kl",
    "ppo/entropy",
]


def ppo_config(run_dir: Path, *extra: str):
    return load_config(TINY, [f"run_dir={run_dir}", PPO_STAGES, *BASE_OVERRIDES, *extra])


def copy_inputs(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".work", "ppo"))
    return dest


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


def adapter_moved(run_dir: Path, init_dir: Path, lora) -> list[str]:
    """Names of the saved adapter tensors that still equal their initial values (should be none)."""
    from safetensors.torch import load_file

    from align.ppo.policy import adapter_state, build_policy

    saved = load_file(str(run_dir / "ppo" / "adapter" / "adapter_model.safetensors"))
    fresh = adapter_state(
        {
            n: p.detach()
            for n, p in build_policy(init_dir, lora, "float32", seed=0).named_parameters()
            if p.requires_grad
        }
    )
    fresh = {k.replace(".default", ""): v for k, v in fresh.items()}
    assert set(saved) == set(fresh) and len(saved) > 0
    return [k for k in saved if torch.equal(saved[k], fresh[k])]


def test_engine_replicas_split_the_prompts_and_sit_on_every_wth_rank(monkeypatch):
    from align.config import RolloutConfig
    from align.configlib import ConfigError
    from align.errors import AlignError
    from align.ppo.stage import engine_replicas, replica_slice

    def ro(replicas, tp=1):
        return RolloutConfig(in_process=False, replicas=replicas, tensor_parallel_size=tp)

    # 10 prompts over 3 replicas: consecutive shares, the first one longer, every prompt once
    shares = [replica_slice(10, r, 3) for r in range(3)]
    assert [(x.start, x.stop) for x in shares] == [(0, 4), (4, 7), (7, 10)]
    assert [replica_slice(1, r, 2) for r in range(2)] == [slice(0, 1), slice(1, 1)]  # a replica may get none
    # 16 ranks on 2 nodes of 8, 4 replicas: engines on ranks 0, 4, 8, 12; two a node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "4")
    assert engine_replicas(ro(4), 16, 12) == (4, 4, (1, 2))
    with pytest.raises(ConfigError, match="rollout.replicas=4: each colocated engine .* tensor_parallel_size=8"):
        engine_replicas(ro(4, tp=8), 16, 12)  # engines 4 ranks apart cannot each take 8 GPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    with pytest.raises(AlignError, match="does not tile machines of 6 ranks"):
        engine_replicas(ro(3), 12, 4)  # an engine every 4 ranks on machines of 6
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert engine_replicas(ro(1), 2, 0) == (1, 2, (0, 1))
    with pytest.raises(ConfigError, match="rollout.replicas=3: .* must divide ppo.num_processes=2"):
        engine_replicas(ro(3), 2, 0)


def test_iteration_prompts_use_every_prompt_once_per_pass_and_are_reproducible():
    from align.ppo.stage import iteration_prompts

    stream = [i for it in range(1, 6) for i in iteration_prompts(10, 4, seed=3, iteration=it)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each pass
    assert iteration_prompts(10, 4, 3, 3) == stream[8:12]  # a resumed run draws what the whole run drew


def test_split_prompts_holds_out_a_fixed_subset():
    from align.errors import AlignError
    from align.ppo.stage import split_prompts

    rows = [{"i": i} for i in range(20)]
    pool, held = split_prompts(rows, 5, seed=0)
    assert len(held) == 5 and len(pool) == 15 and not {r["i"] for r in pool} & {r["i"] for r in held}
    assert split_prompts(rows, 5, seed=0) == (pool, held)
    with pytest.raises(AlignError, match="heldout_prompts=20"):
        split_prompts(rows, 20, seed=0)


def test_split_unique_prompts_drops_duplicates_before_the_split():
    from align.ppo.stage import split_prompts, split_unique_prompts

    rows = [{"prompt": [{"role": "user", "content": f"p{i % 15}"}], "safety": False, "source": "s"} for i in range(20)]
    pool, held, stats = split_unique_prompts(rows, 5, seed=0)
    assert stats == {"data/duplicates_dropped": 5, "data/heldout_overlap_dropped": 0}  # no copy left to overlap
    assert (pool, held) == split_prompts(rows[:15], 5, seed=0)
    assert split_unique_prompts(rows, 5, seed=0, dedup=False)[:2] == split_prompts(rows, 5, seed=0)


def test_early_stopping_counts_evaluations_without_a_gain():
    from align.ppo.stage import record_eval

    state = {"best_heldout": None, "best_iteration": 0, "bad_evals": 0, "stopped_early": False}
    assert not record_eval(state, 1.0, 0, patience=2)
    assert not record_eval(state, 0.9, 1, patience=2)
    assert not record_eval(state, 1.5, 2, patience=2) and state["bad_evals"] == 0 and state["best_iteration"] == 2
    assert not record_eval(state, 1.5, 3, patience=2)  # equal is not a gain
    assert record_eval(state, 1.2, 4, patience=2) and state["best_heldout"] == 1.5
    never = {"best_heldout": 1.0, "best_iteration": 0, "bad_evals": 0, "stopped_early": False}
    assert not any(record_eval(never, 0.0, i, patience=0) for i in range(5))


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.lora.enabled=false", "PPO trains LoRA adapters"),
        ("ppo.lora.dropout=0.1", "must be 0 in PPO"),
        ("ppo.sampling.temperature=0", "must be > 0"),
        ("ppo.sampling.top_p=0.9", "must be 1.0 in PPO"),
        (
            "ppo.micro_batch_size=3",
            r"mini_batch_size=4 must be a multiple of micro_batch_size \* num_processes = 3 \* 1",
        ),
        ("ppo.num_processes=4", r"micro_batch_size \* num_processes = 2 \* 4 = 8; e.g. micro_batch_size=1"),
        ("ppo.early_stop_patience=2", "needs held-out prompts"),
        ("ppo.reward.shard=true", r"reward.shard=True: shards the reward models over PPO's processes"),
        ("rejection_sampling.reward.shard=true", "rejection sampling scores on rank 0 alone"),
        ("rollout.replicas=2", r"rollout.replicas=2: one engine on every .* must divide ppo.num_processes=1"),
    ],
)
def test_ppo_config_rejects_what_ppo_cannot_run(override, message):
    from align.configlib import ConfigError

    extra = [override] + (["ppo.heldout_prompts=0"] if "patience" in override else [])
    extra += ["rollout.in_process=false"] if "replicas" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [PPO_STAGES, *extra])


@contextlib.contextmanager
def threads(n: int):
    """The tiny model runs faster on one thread, and far faster when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> Path:
    """A run directory holding finished sft, rm_helpful and rm_safety stages of configs/tiny.yaml."""
    from align.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("ppo_inputs") / "run"
    with threads(1):
        run_pipeline(load_config(TINY, [f"run_dir={run_dir}", "stages=[sft,rm_helpful,rm_safety]", *BASE_OVERRIDES]))
    return run_dir


def _run_cli(args, timeout=900, env=None):
    env = {
        **{k: v for k, v in os.environ.items() if k != "ALIGN_FAULT"},
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def ppo_args(run_dir: Path, *extra: str) -> list[str]:
    # In a child process: an in-process vLLM engine pins this process's threads for good.
    return ["stage", "ppo", str(TINY), f"run_dir={run_dir}", PPO_STAGES, *BASE_OVERRIDES, *extra]


@pytest.fixture(scope="module")
def run_a(tiny_inputs, tmp_path_factory):
    """An uninterrupted 1-process tiny PPO run: (run_dir, ppo manifest, metric rows)."""
    run_dir = copy_inputs(tiny_inputs, tmp_path_factory.mktemp("ppo_a") / "run")
    res = _run_cli(ppo_args(run_dir))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return run_dir, json.loads((run_dir / "ppo" / "manifest.json").read_text()), metric_rows(run_dir)


@pytest.mark.slow
def test_tiny_ppo_run_trains_logs_and_saves(run_a):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, manifest, rows = run_a
    cfg = ppo_config(run_dir).ppo
    s = manifest["summary"]
    assert manifest["status"] == "done" and s["iterations"] == cfg.iterations == 4
    assert s["model_dir"] == str(run_dir / "ppo" / "model")
    for k in (
        "reward/combined_first",
        "reward/combined_last",
        "eval/reward_heldout_before",
        "eval/reward_heldout_after",
        "kl/ref_final",
        "kl/ref_final_k3",
        "time/generate_mean_s",
        "time/train_mean_s",
    ):
        assert math.isfinite(s[k]), k
    # one row per iteration, plus step 0 with the held-out reward before training
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows[1:]:
        missing = [k for k in STANDARD if r.get(k) is None or not math.isfinite(r[k])]
        assert not missing, (r["step"], missing)
    assert [r["step"] for r in rows if r.get("eval/reward_heldout") is not None] == [0, 2, 4]  # eval_every 2
    # The policy moved away from the reference ...
    assert rows[1]["kl/ref_mean"] == 0.0  # iteration 1 samples the initial policy: the adapters are still off
    assert all(abs(r["kl/ref_k3_mean"]) > 0 for r in rows[2:])
    # ... and the engine followed it: its log-probs are the trainer's after every weight push
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows[1:])
    # every LoRA tensor moved from its initialisation; the value head learned something
    assert adapter_moved(run_dir, run_dir / "sft" / "model", cfg.lora) == []
    head = load_file(str(run_dir / "ppo" / "value_head.safetensors"))
    assert set(head) == {"weight", "bias"} and head["weight"].abs().sum() > 0
    # a merged, plain checkpoint that differs from the starting one where the adapters act
    model = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "model")
    start = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], start.state_dict()[q])
    assert torch.equal(model.state_dict()["model.norm.weight"], start.state_dict()["model.norm.weight"])
    assert (run_dir / "ppo" / "model" / "tokenizer_config.json").is_file()
    assert (run_dir / "ppo" / "ppo_curve.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, resumed_from",
    [
        ("ppo_iteration:3", "iter-2"),  # killed after iteration 3 was logged: resume from iter-2, drop row 3
        ("ppo_checkpoint:1", None),  # killed inside the iter-2 checkpoint write: no checkpoint, start over
    ],
)
def test_killed_ppo_resumes_from_its_checkpoint_and_matches(point, resumed_from, run_a, tiny_inputs, tmp_path):
    _, _, rows_a = run_a
    run_dir = copy_inputs(tiny_inputs, tmp_path / "run")
    ckpts = run_dir / ".work" / "ppo" / "checkpoints"
    killed = _run_cli(ppo_args(run_dir), env={"ALIGN_FAULT": point})  # align/faults.py: SIGKILL there
    assert killed.returncode == -9, f"fault {point} never fired: {(killed.stdout + killed.stderr)[-2000:]}"
    assert not (run_dir / "ppo").exists()
    if resumed_from:
        assert sorted(p.name for p in ckpts.iterdir()) == [resumed_from]
        assert {"state.json", "trainable.safetensors", "optimizer.pt", "rng_rank0.pt"} <= {
            p.name for p in (ckpts / resumed_from).iterdir()
        }
        assert json.loads((ckpts / resumed_from / "state.json").read_text())["moments"]["count"] == 16  # 2 x 8
        assert [r["step"] for r in read_metrics(run_dir / ".work" / "ppo" / "logs" / "metrics.jsonl")] == [0, 1, 2, 3]
    else:
        [cut] = [p.name for p in ckpts.iterdir()]  # the cut-short write (align/checkpoint.py), never a checkpoint
        assert cut.startswith(".iter-2.tmp")
    res = _run_cli(ppo_args(run_dir))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert ("resuming from" in res.stdout + res.stderr) == bool(resumed_from)
    if resumed_from:
        assert f"resuming from {ckpts / resumed_from}" in res.stdout + res.stderr
    rows_b = metric_rows(run_dir)
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]  # rows logged after the checkpoint are not doubled
    # Resumed from adapters, optimizer, running moments and seeds, it redoes what the whole run did.
    for a, b in zip(rows_a[1:], rows_b[1:]):
        for k in COMPARED:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_two_process_zero3_lora_ppo_run(run_a, tiny_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, rows_a = run_a
    run_dir = copy_inputs(tiny_inputs, tmp_path / "run")
    # the engine runs in its own process: an in-process vLLM would join the ranks' process group
    # 2 iterations, a checkpoint after the first: DeepSpeed's sharded save runs too
    res = _run_cli(
        ppo_args(
            run_dir,
            "ppo.num_processes=2",
            "rollout.in_process=false",
            "ppo.iterations=2",
            "ppo.save_every=1",
            # both reward models partitioned over the 2 ranks (as at 70B): the same scores; an engine on each
            # rank, each sampling half the prompts on one core: the same rows (the whole-RM, one-engine path
            # on 2 ranks runs in the tiny 7B recipe's and the ZeRO-3 push tests)
            "ppo.reward.shard=true",
            "rollout.replicas=2",
        )
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    for r in (0, 1):
        assert f"engine replica {r} of 2 on rank {r}" in res.stdout + res.stderr
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["summary"]["iterations"] == 2
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r.get(k) is not None for r in rows[1:] for k in STANDARD)
    # Iteration 1 samples the same initial policy with the same seed: same batch, same update as 1 process.
    for k in COMPARED:
        assert rows[1][k] == pytest.approx(rows_a[1][k], rel=1e-4, abs=1e-6), k
    cfg = ppo_config(run_dir).ppo
    assert adapter_moved(run_dir, run_dir / "sft" / "model", cfg.lora) == []
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "model")  # gathered and merged, not shards


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_dir):
    """`ppo.gradient_checkpointing` (70B at 4,096 tokens): the update's backward recomputes each layer,
    with the same gradients on the LoRA adapters and the value head."""
    from align.ppo.policy import build_policy

    lora = load_config(TINY, [PPO_STAGES]).ppo.lora
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    grads = []
    for ckpt in (False, True):
        net = build_policy(tiny_dir, lora, "float32", seed=0, gradient_checkpointing=ckpt).train()
        assert net.policy.get_base_model().is_gradient_checkpointing == ckpt
        logits, values = net(ids, mask, 4, 8)
        (logits.float().logsumexp(-1).mean() + values.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0 or "lora_A" in n, n  # B starts at zero, so A has no gradient yet
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def _fixed_trajectory(model_dir: Path, cfg, seed: int = 0):
    """A rollout batch of random prompts and responses, with the tiny policy's own log-probs and values."""
    from align.ppo.policy import build_policy, torch_learner
    from align.ppo.train import build_batch, make_trajectory

    g = torch.Generator().manual_seed(seed)
    B = cfg.prompts_per_iteration
    prompts = [
        torch.randint(3, 250, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(B)
    ]
    responses = [
        torch.randint(3, 250, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(B)
    ]
    ids, attn, resp = build_batch(prompts, responses, pad_id=0)
    learner = torch_learner(build_policy(model_dir, cfg.lora, "float32", seed=0), cfg)
    scores = torch.randn(B, generator=g)
    traj, _ = make_trajectory(learner, ids, attn, resp, torch.zeros(resp.shape), scores, cfg, autocast=False)
    # a non-zero value head target and advantages of both signs: the update has something to do
    assert traj.advantages[resp].min() < 0 < traj.advantages[resp].max()
    return traj


@pytest.mark.slow
def test_two_process_update_equals_one_process_update(tmp_path, tiny_dir):
    """Same batch, same seeds: 2 ZeRO-3 ranks x 2 micro-batches of 1 give the 1-process, 1-micro-batch steps."""
    from safetensors.torch import load_file

    from align.config import PPOConfig
    from align.configlib import build
    from align.launch import write_launch_files
    from align.ppo.core import Trajectory
    from align.ppo.policy import build_policy, torch_learner
    from align.ppo.train import ppo_update

    base = {
        "prompts": [{"format": "synthetic_prompts"}],
        "prompts_per_iteration": 8,
        "mini_batch_size": 4,
        "ppo_epochs": 2,
        "lr": 1e-2,
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "vf_coef": 0.5,
    }
    one = build(PPOConfig, {**base, "micro_batch_size": 4})
    traj = _fixed_trajectory(tiny_dir, one)
    torch.save(traj.state_dict(), tmp_path / "traj.pt")
    learner = torch_learner(build_policy(tiny_dir, one.lora, "float32", seed=0), one)
    _, steps_1 = ppo_update(
        learner, Trajectory.from_state_dict(torch.load(tmp_path / "traj.pt")), one, seed=1, autocast=False, iteration=1
    )
    state_1 = learner.trainable_state()
    assert len(steps_1) == 2 * 8 // 4  # epochs x mini-batches: one optimizer step each

    (tmp_path / "cfg.json").write_text(json.dumps({**base, "micro_batch_size": 1, "num_processes": 2}))
    acc = write_launch_files(tmp_path / "launch", 2, None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(acc),
            str(WORKER),
            str(tiny_dir),
            str(tmp_path / "traj.pt"),
            str(tmp_path / "cfg.json"),
            str(tmp_path / "launch" / "ds_zero3.json"),
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    steps_2 = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert len(steps_2) == len(steps_1)
    for k, (a, b) in enumerate(zip(steps_1, steps_2)):
        for name in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), (k, name)
    # later steps saw different weights than the first: the updates themselves agreed
    assert abs(steps_1[-1]["ppo/policy_loss"] - steps_1[0]["ppo/policy_loss"]) > 1e-4
    state_2 = load_file(str(tmp_path / "out" / "trainable.safetensors"))
    assert set(state_2) == set(state_1)
    for n in state_1:
        assert torch.allclose(state_2[n], state_1[n], atol=1e-5, rtol=1e-4), n


def test_the_lr_is_the_configs_at_every_step_through_the_shared_scheduler(tiny_dir):
    """PPO's constant lr runs through align/schedule.py's scheduler (no warm-up, floor 1): the optimizer's
    lr at every step of three iterations is the config's, the scheduler moved one step per mini-batch, a
    resumed run's scheduler starts where it stopped, and the updates are those of the bare optimizer."""
    from align.config import PPOConfig
    from align.configlib import build
    from align.ppo.policy import build_policy, lr_scheduler, steps_per_iteration, torch_learner
    from align.ppo.train import ppo_update

    cfg = build(
        PPOConfig,
        {
            "prompts": [{"format": "synthetic_prompts"}],
            "iterations": 3,
            "prompts_per_iteration": 8,
            "mini_batch_size": 4,
            "micro_batch_size": 4,
            "ppo_epochs": 2,
            "lr": 1e-2,
            "lora": {"enabled": True, "r": 4, "alpha": 8},
        },
    )
    traj = _fixed_trajectory(tiny_dir, cfg)
    learner = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
    scheduler = lr_scheduler(learner.optimizer, cfg)
    lrs: list[list[float]] = []
    accumulate = learner.accumulate

    def recording(loss, boundary):
        if boundary:  # the lr this optimizer step runs at
            lrs.append([g["lr"] for g in learner.optimizer.param_groups])
        return accumulate(loss, boundary)

    learner.accumulate = recording
    scheduled = [
        ppo_update(learner, traj, cfg, seed=it, autocast=False, iteration=it, scheduler=scheduler)[1]
        for it in (1, 2, 3)
    ]
    per = steps_per_iteration(cfg)
    assert per == 2 * 8 // 4 and len(lrs) == 3 * per and scheduler.last_epoch == 3 * per
    assert lrs == [[cfg.lr, cfg.lr]] * (3 * per)

    resumed = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
    resumed.optimizer.load_state_dict(learner.optimizer.state_dict())
    again = lr_scheduler(resumed.optimizer, cfg, iteration=2)
    assert again.last_epoch == 2 * per and again.get_last_lr() == [cfg.lr, cfg.lr]

    bare = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
    plain = [ppo_update(bare, traj, cfg, seed=it, autocast=False, iteration=it)[1] for it in (1, 2, 3)]
    assert plain == scheduled
    assert scheduled[2][-1]["ppo/policy_loss"] != scheduled[0][0]["ppo/policy_loss"]  # the steps moved


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_non_finite_mini_batch_stops_or_is_skipped_without_touching_the_weights(tmp_path, tiny_dir, mode):
    from align.config import PPOConfig
    from align.configlib import build
    from align.errors import AlignError
    from align.ppo.policy import build_policy, torch_learner
    from align.ppo.train import ppo_update

    cfg = build(
        PPOConfig,
        {
            "prompts": [{"format": "synthetic_prompts"}],
            "prompts_per_iteration": 8,
            "mini_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 1e-2,
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "nonfinite": mode,
        },
    )
    traj = _fixed_trajectory(tiny_dir, cfg)
    traj.advantages[:] = float("nan")  # every mini-batch's policy loss is NaN
    learner = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
    before = learner.trainable_state()
    if mode == "stop":
        with pytest.raises(AlignError, match="iteration 7: non-finite PPO loss"):
            ppo_update(learner, traj, cfg, seed=1, autocast=False, iteration=7)
    else:
        with pytest.raises(AlignError, match="iteration 7: every PPO step was non-finite and skipped"):
            ppo_update(learner, traj, cfg, seed=1, autocast=False, iteration=7)
    after = learner.trainable_state()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in learner.params)


def test_skip_counts_the_non_finite_mini_batch_and_trains_on_the_rest(tiny_dir):
    from align.config import PPOConfig
    from align.configlib import build
    from align.ppo.policy import build_policy, torch_learner
    from align.ppo.train import ppo_update

    cfg = build(
        PPOConfig,
        {
            "prompts": [{"format": "synthetic_prompts"}],
            "prompts_per_iteration": 8,
            "mini_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 1e-2,
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "nonfinite": "skip",
        },
    )
    traj = _fixed_trajectory(tiny_dir, cfg)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    traj.advantages[perm[0]] = float("nan")  # poisons the first mini-batch only
    learner = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
    before = learner.trainable_state()
    mean, steps = ppo_update(learner, traj, cfg, seed=1, autocast=False, iteration=1)
    assert mean["ppo/skipped_steps"] == 1.0 and len(steps) == 1
    assert all(map(lambda s: all(v == v for v in s.values()), steps))  # the kept step is finite
    after = learner.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_skip_needs_one_process():
    from align.configlib import ConfigError

    with pytest.raises(ConfigError, match="'skip' runs on one process only"):
        load_config(
            TINY,
            [
                PPO_STAGES,
                "ppo.nonfinite=skip",
                "ppo.num_processes=2",
                "ppo.mini_batch_size=4",
                "ppo.micro_batch_size=2",
            ],
        )


def test_held_out_reward_averages_eval_samples_per_prompt(tiny_dir, tiny_tok):
    """`ppo.eval_samples`: each held-out prompt's reward is the mean over its samples (rows grouped by
    prompt), and its first sample is the one a one-sample evaluation draws (same seeds)."""
    from dataclasses import replace

    from align.config import RolloutConfig
    from align.ppo.stage import RewardModels, Run, evaluate, generate, plain, sampling_seed
    from reward.combined import combined_reward
    from reward.model import RewardScorer, load_reward_model
    from rollout import make_engine

    torch.manual_seed(0)
    scorer = RewardScorer(load_reward_model(tiny_dir, tiny_tok), tiny_tok, max_length=128)
    rewards = object.__new__(RewardModels)  # the stage's class, its two scorers given here, one process
    rewards.helpful, rewards.safety, rewards.batch_size, rewards.rank, rewards.world = scorer, scorer, 4, 0, 1
    rewards.sharded = False
    heldout = [{"prompt": [{"role": "user", "content": f"tell me about {w}"}], "safety": w == "locks"} for w in
               ("cats", "rain", "locks")]  # fmt: skip
    cfg = replace(
        load_config(TINY, [PPO_STAGES]).ppo,
        sampling=replace(load_config(TINY, [PPO_STAGES]).ppo.sampling, max_new_tokens=6),
    )
    engine = make_engine(RolloutConfig(engine="transformers"), tiny_dir, dtype="float32")
    run = Run(None, None, engine, rewards, tiny_tok, [], heldout, None, {}, None, False)
    one = evaluate(run, replace(cfg, eval_samples=1), seed=0)
    three = evaluate(run, replace(cfg, eval_samples=3), seed=0)
    rows = generate(run, heldout, cfg, sampling_seed(0, 0), n=3)
    rs, rh = rewards.score([plain(p["prompt"]) for p in heldout for _ in range(3)], rows.texts)
    flags = torch.tensor([p["safety"] for p in heldout for _ in range(3)])
    each, _ = combined_reward(rs, rh, flags, None, cfg.reward.safety_threshold, whiten=False)
    each = each.view(3, 3)
    assert len(one) == len(three) == 3
    assert three == pytest.approx(each.mean(1).tolist(), abs=1e-6)
    assert one == pytest.approx(each[:, 0].tolist(), abs=1e-6)
    assert len(set(rows.texts)) > 3  # the samples of a prompt differ: the mean is over different answers
