"""reward/train.py: schedule, data order, a tiny RM that learns an easy preference, exact resume, and
the same run on 2 processes under ZeRO-3."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.checkpoint import list_checkpoints
from align.config import DatasetSpec, LoraConfig, RewardConfig, TrainConfig
from align.errors import AlignError
from reward.model import RewardScorer, load_reward_model
from reward.train import (
    Position,
    build_data,
    epoch_micro_batches,
    evaluate_model,
    micro_batch_stream,
    setup_learner,
    token_pieces,
    total_steps,
    train_reward_model,
)


class ListLogger:
    def __init__(self, crash_at: int = 0):
        self.rows, self.crash_at = [], crash_at

    def log(self, metrics, step):
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash at step {step}")
        self.rows.append((step, dict(metrics)))


def rm_config(max_steps=20, lr=1e-3, save_steps=100, lora=False, **kw) -> RewardConfig:
    return RewardConfig(
        primary=(DatasetSpec(format="synthetic_pref"),),
        margin="small",
        max_length=256,
        train=TrainConfig(
            lr=lr,
            min_lr_ratio=0.1,
            warmup_ratio=0.1,
            batch_size=8,
            micro_batch_size=4,
            max_steps=max_steps,
            save_steps=save_steps,
            save_total_limit=2,
            lora=LoraConfig(enabled=lora, r=8, alpha=16),
        ),
        **kw,
    )


def moved(init_dir, rm_dir) -> dict[str, bool]:
    """Per backbone tensor of the saved RM: whether it differs from the model it started from."""
    before = load_file(str(Path(init_dir) / "model.safetensors"))
    after = load_file(str(Path(rm_dir) / "model.safetensors"))
    return {n: not torch.equal(before[n].float(), after[n].float()) for n in before if n in after}


def test_total_steps():
    tc = TrainConfig(batch_size=8, micro_batch_size=4, epochs=1.0)  # grad_accum 2
    assert total_steps(64, tc) == 8
    assert total_steps(65, tc) == 9  # 17 micro-batches: the last step holds the leftover pair
    assert total_steps(64, TrainConfig(batch_size=8, micro_batch_size=4, epochs=0.5)) == 4
    assert total_steps(64, TrainConfig(batch_size=8, micro_batch_size=4, max_steps=3)) == 3
    # 2 processes, 1 micro-batch of 4 each per step: the same 8 pairs per step
    assert total_steps(64, TrainConfig(batch_size=8, micro_batch_size=4, num_processes=2)) == 8


def test_epoch_micro_batches_cover_every_pair_once_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(50)]
    mbs = epoch_micro_batches(lengths, micro=4, batch=8, seed=3, epoch=0)
    assert sorted(i for mb in mbs for i in mb) == list(range(50))
    assert mbs == epoch_micro_batches(lengths, micro=4, batch=8, seed=3, epoch=0)
    assert mbs != epoch_micro_batches(lengths, micro=4, batch=8, seed=3, epoch=1)
    # grouped: within a micro-batch lengths are close (windows of 64 pairs, here the whole epoch)
    spread = sum(max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for mb in mbs) / len(mbs)
    assert spread < 10


def test_stream_resumes_at_any_position():
    lengths = list(range(10))
    full = micro_batch_stream(lengths, 3, 6, seed=1, skip=0)
    seq = [next(full) for _ in range(11)]  # 4 micro-batches per epoch: crosses two epoch boundaries
    later = micro_batch_stream(lengths, 3, 6, seed=1, skip=5)
    assert [next(later) for _ in range(6)] == seq[5:]


def test_tiny_rm_learns_an_easy_preference(tiny_dir, tiny_tok, tmp_path, make_pairs):
    train, held_out = make_pairs(64, seed=0), make_pairs(32, seed=1)
    cfg = rm_config(max_steps=20, lr=1e-3)
    torch.manual_seed(0)
    before = RewardScorer(load_reward_model(tiny_dir, tiny_tok), tiny_tok, 256)
    prompts = [r["prompt"] for r in held_out]
    gap_before = before.score(prompts, [r["chosen"] for r in held_out]) - before.score(
        prompts, [r["rejected"] for r in held_out]
    )
    logger = ListLogger()
    out = train_reward_model(tiny_dir, tiny_tok, train, held_out, cfg, tmp_path, seed=0, logger=logger)
    change = moved(tiny_dir, tmp_path / "model")
    assert change and all(change.values()) and out["params_trainable"] > 0  # every backbone tensor trained
    assert out["eval"]["rm/accuracy"] >= 0.9
    assert out["eval"]["rm/gap/mean"] > gap_before.mean().item() + 1.0
    for level in ("significantly_better", "better", "slightly_better", "negligibly_better"):
        assert f"rm/accuracy/{level}" in out["eval"]
    steps = [s for s, m in logger.rows if "rm/loss" in m]
    assert steps == list(range(1, 21))
    losses = [m["rm/loss"] for s, m in logger.rows if "rm/loss" in m]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    first = logger.rows[0][1]
    for key in ("rm/accuracy", "rm/margin_mean", "rm/lr", "rm/grad_norm", "rm/pad_share"):
        assert key in first
    assert first["rm/margin_mean"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4, abs=0.2)
    assert any("eval/rm/accuracy" in m for _, m in logger.rows)
    for name in ("eval.json", "eval.md", "eval_gaps.png", "train_summary.json", "model/config.json"):
        assert (tmp_path / name).is_file(), name


def test_phases_on_their_own_give_what_the_run_reported(tiny_dir, tiny_tok, tmp_path, make_pairs):
    """`build_data`, `setup_learner` and `evaluate_model`, each on its own after a run: the run's data, the
    position of its newest checkpoint, and for the saved model the evaluation the run reported."""
    train, held_out = make_pairs(16, seed=3), make_pairs(12, seed=4)
    cfg = rm_config(max_steps=4, save_steps=2)
    out = train_reward_model(tiny_dir, tiny_tok, train, held_out, cfg, tmp_path, seed=0)

    data = build_data(tiny_tok, train, cfg, seed=0)
    assert (data.steps, data.warmup) == (4, 1)  # warm-up ceil(0.1 * 4)
    assert (data.steps, data.warmup, len(data.pairs), data.truncated) == (
        out["steps"],
        out["warmup_steps"],
        out["train_pairs"],
        out["truncated_pairs"],
    )
    assert build_data(tiny_tok, train, cfg, seed=1).fingerprint != data.fingerprint

    # the step-2 checkpoint (none at the end: the model is written then); 2 micro-batches of 4 a step
    run = setup_learner(tiny_dir, tiny_tok, cfg, data, tmp_path / "checkpoints", seed=0, bf16=False, ds_config=None)
    assert run.start == Position(step=2, micro_batches=4, pairs_seen=16, skipped_steps=0)
    assert run.scheduler.last_epoch == 2 and run.shared

    results = evaluate_model(RewardScorer.from_pretrained(tmp_path / "model"), held_out, cfg.train)
    assert results["n_pairs"] == 12 and set(results["metrics"]) == set(out["eval"])
    assert results["metrics"] == pytest.approx(out["eval"], rel=1e-5, abs=1e-6, nan_ok=True)


def test_long_pairs_are_truncated_never_dropped(tiny_dir, tiny_tok, tmp_path, make_pairs):
    records = make_pairs(8, seed=2)
    for r in records[:3]:
        r["prompt"] = [{"role": "user", "content": "tell me " * 100}]
    cfg = rm_config(max_steps=1)
    out = train_reward_model(tiny_dir, tiny_tok, records, [], cfg, tmp_path, seed=0)
    assert out["train_pairs"] == 8 and out["truncated_pairs"] == 3


def test_token_pieces_cut_a_padded_micro_batch_under_the_budget():
    lengths = [300, 1024, 280, 310, 1000, 290, 295, 305]
    pieces = token_pieces(lengths, 2048)
    assert sorted(i for p in pieces for i in p) == list(range(8))  # every pair once
    assert pieces == [[1, 4], [3, 7, 0, 6, 5, 2]]  # longest first: 2 x 1,024, then 6 x 310
    assert all(len(p) * lengths[p[0]] <= 2048 for p in pieces)
    assert token_pieces(lengths, 0) == [sorted(range(8), key=lambda i: -lengths[i])]  # off: one piece
    assert token_pieces([100] * 8, 2048) == [list(range(8))]  # already under the budget
    assert token_pieces([3000, 10], 2048) == [[0], [1]]  # a row over the budget is a piece of its own
    assert token_pieces([], 2048) == []


def test_micro_batch_tokens_cut_the_forwards_not_the_step(tiny_dir, tiny_tok, tmp_path, make_pairs, monkeypatch):
    """Pieces of a micro-batch give the step of the whole micro-batch: the losses and gradient norms
    are normalised by the step's pairs, whatever the forwards (fp32)."""
    from dataclasses import replace

    import reward.train as rt

    records = make_pairs(8, seed=6)
    lengths = sorted(p.shared_length for p in rt.encode_pairs(tiny_tok, records, rm_config()))
    budget = 3 * lengths[len(lengths) // 2]  # about three rows a piece
    rows, forwards = {}, {}
    real = rt.shared_prefix_scores
    for b in (0, budget):
        cfg = rm_config(max_steps=3, micro_batch_tokens=b)
        cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=8))
        logger, calls = ListLogger(), []
        monkeypatch.setattr(
            rt,
            "shared_prefix_scores",
            lambda model, packed, _calls=calls: (_calls.append(tuple(packed.input_ids.shape)), real(model, packed))[1],
        )
        train_reward_model(tiny_dir, tiny_tok, records, [], cfg, tmp_path / str(b), seed=0, logger=logger)
        rows[b], forwards[b] = [m for _, m in logger.rows], calls
    assert len(forwards[0]) == 3 and len(forwards[budget]) > 3  # one forward a step, then several
    assert all(n * t <= budget or n == 1 for n, t in forwards[budget])
    for a, c in zip(rows[0], rows[budget]):
        for k in ("rm/loss", "rm/grad_norm", "rm/accuracy"):
            assert c[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_micro_batch_tokens_is_one_process_only():
    from align.configlib import ConfigError

    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        RewardConfig(micro_batch_tokens=2048, train=TrainConfig(num_processes=2, batch_size=16))


def _final_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_a_crash_reproduces_the_straight_run(tiny_dir, tiny_tok, tmp_path, lora, make_pairs):
    records = make_pairs(40, seed=4)
    cfg = rm_config(max_steps=6, save_steps=3, lr=5e-4, lora=lora)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_reward_model(tiny_dir, tiny_tok, records, [], cfg, straight, seed=7)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(tiny_dir, tiny_tok, records, [], cfg, crashed, seed=7, logger=ListLogger(crash_at=4))
    assert [p.name for p in list_checkpoints(crashed / "checkpoints", "step")] == ["step-3"]
    assert not (crashed / "model").exists()
    logger = ListLogger()
    out = train_reward_model(tiny_dir, tiny_tok, records, [], cfg, crashed, seed=7, logger=logger)
    assert [s for s, _ in logger.rows] == [4, 5, 6]  # continued, did not start over
    assert out["pairs_seen"] == 6 * 8
    a, b = _final_weights(straight), _final_weights(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_refuses_a_checkpoint_of_another_config(tiny_dir, tiny_tok, tmp_path, make_pairs):
    records = make_pairs(16, seed=4)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(
            tiny_dir,
            tiny_tok,
            records,
            [],
            rm_config(max_steps=4, save_steps=1),
            tmp_path,
            seed=0,
            logger=ListLogger(crash_at=2),
        )
    with pytest.raises(AlignError, match="different config"):
        train_reward_model(
            tiny_dir, tiny_tok, records, [], rm_config(max_steps=4, save_steps=1, lr=2e-3), tmp_path, seed=0
        )


def test_shared_prefix_rows_train_like_separate_rows(tiny_dir, tiny_tok, tmp_path, make_pairs):
    """One [prompt, chosen, rejected] row per pair trains as chosen and rejected in rows of their own:
    the same pairs per step (one micro-batch holds all 8), the same losses and gradient norms (fp32)."""
    from dataclasses import replace

    records = make_pairs(8, seed=6)
    rows = {}
    for shared in (True, False):
        cfg = rm_config(max_steps=3, shared_prefix=shared)
        cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=8))
        logger = ListLogger()
        train_reward_model(tiny_dir, tiny_tok, records, [], cfg, tmp_path / str(shared), seed=0, logger=logger)
        rows[shared] = [m for _, m in logger.rows]
    assert [r["rm/loss"] for r in rows[True]] != [rows[True][0]["rm/loss"]] * 3  # it trains
    for a, b in zip(rows[True], rows[False]):
        for k in ("rm/loss", "rm/grad_norm", "rm/accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert rows[True][0]["rm/pad_share"] < rows[False][0]["rm/pad_share"] or rows[True][0]["rm/pad_share"] == 0


def poison_scores(monkeypatch, bad) -> None:
    """Make the reward model's scores NaN on the forward calls (1-based) for which ``bad(call)`` is true."""
    import reward.train as train_mod

    real = train_mod.shared_prefix_scores  # the default forward: one [prompt, chosen, rejected] row per pair
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        c, r = real(model, batch)
        return (c * float("nan"), r) if bad(calls["n"]) else (c, r)

    monkeypatch.setattr(train_mod, "shared_prefix_scores", poisoned)


def test_non_finite_loss_names_the_step(tiny_dir, tiny_tok, tmp_path, monkeypatch, make_pairs):
    poison_scores(monkeypatch, lambda call: call > 4)  # steps 1-2 fine (2 micro-batches each)
    with pytest.raises(AlignError, match="non-finite loss .* at step 3"):
        train_reward_model(tiny_dir, tiny_tok, make_pairs(16), [], rm_config(max_steps=4), tmp_path, seed=0)


def test_nonfinite_skip_skips_the_step_and_counts_it(tiny_dir, tiny_tok, tmp_path, monkeypatch, make_pairs):
    from dataclasses import replace

    poison_scores(monkeypatch, lambda call: call == 5)  # the first micro-batch of step 3
    cfg = rm_config(max_steps=4)
    cfg = replace(cfg, train=replace(cfg.train, nonfinite="skip"))
    logger = ListLogger()
    summary = train_reward_model(tiny_dir, tiny_tok, make_pairs(16), [], cfg, tmp_path, seed=0, logger=logger)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert [r["rm/skipped_steps"] for _, r in logger.rows if "rm/skipped_steps" in r] == [0, 0, 1, 1]
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "model" / "model.safetensors")).values())


def test_safety_aux_loss_runs_and_needs_labels(tiny_dir, tiny_tok, tmp_path, make_pairs):
    labelled = make_pairs(16, seed=5, category="safety", safety_labels=True)
    logger = ListLogger()
    cfg = rm_config(max_steps=2, safety_aux_weight=1.0, category="safety")
    train_reward_model(tiny_dir, tiny_tok, labelled, [], cfg, tmp_path / "a", seed=0, logger=logger)
    assert all(m["rm/safety_aux_loss"] > 0 for _, m in logger.rows)
    with pytest.raises(AlignError, match="no training pair has a safety label"):
        train_reward_model(tiny_dir, tiny_tok, make_pairs(16), [], cfg, tmp_path / "b", seed=0)


def test_bf16_autocast_run(tiny_dir, tiny_tok, tmp_path, make_pairs):
    out = train_reward_model(
        tiny_dir, tiny_tok, make_pairs(16), make_pairs(8, seed=9), rm_config(max_steps=2), tmp_path, seed=0, bf16=True
    )
    assert math.isfinite(out["final_train_metrics"]["rm/loss"]) and any(moved(tiny_dir, tmp_path / "model").values())


@pytest.mark.parametrize("bf16", [False, True])
def test_frozen_lower_layers_stay_as_loaded(tiny_dir, tiny_tok, tmp_path, make_pairs, bf16):
    out = train_reward_model(
        tiny_dir, tiny_tok, make_pairs(16), [], rm_config(max_steps=2, freeze_layers=1), tmp_path, seed=0, bf16=bf16
    )
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    lower = [n for n in before if n.startswith("model.layers.0.") or "embed_tokens" in n]
    upper = [n for n in before if n.startswith("model.layers.1.")]
    assert lower and upper and out["params_trainable"] > 0
    for n in lower:  # in bf16 a frozen weight is its bf16 rounding, never trained (align/launch/local.py)
        assert torch.equal(after[n], before[n].bfloat16().float() if bf16 else before[n]), n
    assert all(not torch.equal(after[n], before[n]) for n in upper)


ROOT = Path(__file__).resolve().parents[2]
RM_ARGS = [
    "stages=[rm_helpful]",
    "rm_helpful.init=base",
    "rm_helpful.train.micro_batch_size=4",
    "rm_helpful.train.max_steps=4",
    "rm_helpful.train.save_steps=2",
    "precision=fp32",
]


def _loss_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "rm_helpful" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rm/loss" in r]


@pytest.mark.slow
def test_two_process_zero3_run_equals_one_process_and_resumes(tmp_path, tiny_dir):
    """`align rm train` on 2 ZeRO-3 processes (killed after its step-2 checkpoint, then resumed) trains
    what one process trains on the same pairs: a step of 2 x 4 pairs there, 1 x 2 x 4 pairs here."""
    from align.config import load_config
    from align.pipeline import run_pipeline

    tiny = ROOT / "configs" / "tiny.yaml"
    one = tmp_path / "one"
    run_pipeline(load_config(tiny, [f"run_dir={one}", *RM_ARGS]), only="rm_helpful")

    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "align.cli",
        "rm",
        "train",
        str(tiny),
        f"run_dir={two}",
        *RM_ARGS,
        "rm_helpful.train.num_processes=2",
    ]
    killed = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "ALIGN_FAULT": "rm_step:3"}
    )  # both ranks die in step 3
    assert killed.returncode != 0, (killed.stdout + killed.stderr)[-3000:]
    ckpt = two / ".work" / "rm_helpful" / "checkpoints" / "step-2"
    assert (ckpt / "ds").is_dir() and {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    rows_1, rows_2 = _loss_rows(one), _loss_rows(two)
    assert [r["step"] for r in rows_2] == [1, 2, 3, 4]  # 1-2 before the kill, 3-4 resumed
    # fp32: the same pairs per step and the same gradient, so the same losses, grad norms and lr
    for a, b in zip(rows_1, rows_2):
        for k in ("rm/loss", "rm/grad_norm", "rm/accuracy", "rm/lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w_1 = load_file(str(one / "rm_helpful" / "model" / "model.safetensors"))
    w_2 = load_file(str(two / "rm_helpful" / "model" / "model.safetensors"))  # gathered, not shards
    assert w_2.keys() == w_1.keys()
    for k in w_1:
        assert torch.allclose(w_2[k], w_1[k], atol=1e-5), k
    summary = json.loads((two / "rm_helpful" / "manifest.json").read_text())["summary"]
    assert summary["rm/steps"] == 4 and summary["eval/rm/accuracy"] >= 0.8
    scorer = RewardScorer.from_pretrained(two / "rm_helpful" / "model", max_length=256)
    scores = scorer.score([[{"role": "user", "content": "Tell me about tea."}]] * 2, ["Happy to help.", "QXZ #@!"])
    assert torch.isfinite(scores).all()
