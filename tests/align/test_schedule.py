"""align/schedule.py against numbers worked out by hand, and the schedule the trainers actually run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from align.config import load_config
from align.schedule import lr_factor, warmup_steps

ROOT = Path(__file__).resolve().parents[2]


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert f[:3] == pytest.approx([0.5, 1.0, 1.0])  # the first step trains at lr/warmup; the peak at step 2
    # cosine over steps 2..9: progress (s - 2) / 7; 0.1 + 0.9 * (1 + cos(3 pi / 7)) / 2 at step 5
    assert f[5] == pytest.approx(0.1 + 0.45 * (1 + math.cos(3 * math.pi / 8)))
    assert f[5] == pytest.approx(0.7222, abs=1e-4)
    assert f[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))  # just above the floor
    assert f[9] > 0.1
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(0, 0, 1, 0.1) == pytest.approx(1.0)  # no warm-up, a single step: the peak
    assert lr_factor(50, 2, 10, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def test_constant_is_no_warmup_and_a_floor_of_one():
    assert [lr_factor(s, 0, 5, 1.0) for s in range(5)] == [1.0] * 5


def test_default_sft_schedule_by_hand():
    """default.yaml's SFT: 6 steps, warm-up ceil(0.03 * 6) = 1 step, floor 0. The warm-up step trains at
    the peak (1/1), then the cosine over steps 1..5, progress (s - 1) / 5: the floor 0 would be step 6."""
    cfg = load_config(ROOT / "configs" / "default.yaml").sft.train
    assert (cfg.max_steps, cfg.warmup_ratio, cfg.min_lr_ratio) == (6, 0.03, 0.0)
    f = [lr_factor(s, warmup_steps(6, 0.03), 6, 0.0) for s in range(6)]
    c = [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]  # 1, 0.9045, 0.6545, 0.3455, 0.0955
    assert f == pytest.approx([1.0, *c], abs=1e-12)
    assert f[-1] == pytest.approx(0.0955, abs=1e-4)
    assert min(f) > 0  # no step at lr 0: transformers' convention ran the first one there


def test_warmup_steps_round_up():
    assert warmup_steps(6, 0.03) == 1 and warmup_steps(120, 0.03) == 4 and warmup_steps(100, 0.0) == 0


def _lrs_at_each_step(opt, sched, n: int) -> list[float]:
    """The lr each of `n` optimizer steps runs at."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_scheduler_runs_lr_factor_and_starts_mid_run():
    torch = pytest.importorskip("torch")
    from align.schedule import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lrs = _lrs_at_each_step(opt, lr_scheduler(opt, 2, 10, 0.1), 10)
    assert lrs == pytest.approx([2.0 * lr_factor(s, 2, 10, 0.1) for s in range(10)], abs=1e-12)
    assert lrs[:2] == pytest.approx([1.0, 2.0]) and lrs[-1] == pytest.approx(
        2.0 * (0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    )
    # a run resumed after 6 steps, its optimizer restored (it carries the peak as `initial_lr`)
    resumed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    resumed.load_state_dict(opt.state_dict())
    assert _lrs_at_each_step(resumed, lr_scheduler(resumed, 2, 10, 0.1, start=6), 4) == pytest.approx(lrs[6:])


def test_shipped_reward_model_schedules():
    """The reward models' multipliers for configs/default.yaml, worked by hand: rm_helpful 120 steps,
    rm_safety 60, both warm-up 0.03 (4 and 2 steps) and floor 0.1, reached one step after the last."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    h, s = cfg.rm_helpful.train, cfg.rm_safety.train
    fh = [lr_factor(i, warmup_steps(h.max_steps, h.warmup_ratio), h.max_steps, h.min_lr_ratio) for i in range(120)]
    fs = [lr_factor(i, warmup_steps(s.max_steps, s.warmup_ratio), s.max_steps, s.min_lr_ratio) for i in range(60)]
    assert fh[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 116))])
    assert fh[61] == pytest.approx(0.1 + 0.45 * (1 + math.cos(57 * math.pi / 116)))
    assert fh[119] == pytest.approx(0.1 + 0.45 * (1 + math.cos(115 * math.pi / 116)))
    assert fs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert fs[30] == pytest.approx(0.1 + 0.45 * (1 + math.cos(28 * math.pi / 58)))
    assert fs[59] == pytest.approx(0.1 + 0.45 * (1 + math.cos(57 * math.pi / 58)))


CHATS = [
    [{"role": "user", "content": q, "train": False}, {"role": "assistant", "content": a, "train": True}]
    for q, a in [
        ("Name a colour.", "Blue."),
        ("Hi", "Hello there, friend."),
        ("Thanks", "You are welcome."),
        ("Two plus two?", "Four."),
    ]
]


def test_sft_trainer_steps_at_lr_factor(tmp_path, tiny_dir, monkeypatch):
    """The lr of each optimizer step of the SFT trainer (align.sft.train_sft: SFT, rejection sampling and
    GAtt), read off its optimizer before the step, for default.yaml's SFT section: peak * lr_factor, the
    first step included (transformers' cosine ran it at lr 0)."""
    from transformers import TrainerCallback

    import align.sft as sft
    from align.models import load_tokenizer
    from align.pipeline import prepare

    tc = load_config(ROOT / "configs" / "default.yaml").sft.train
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["stages=[sft]", f"run_dir={tmp_path}/run"])
    ctx = prepare(cfg, "sft")
    lrs: list[float] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])

    base = sft.sft_trainer_class()

    class Recording(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(Record())

    dataset, _ = sft.tokenize_conversations(load_tokenizer(tiny_dir), [{"messages": c} for c in CHATS], 512)
    monkeypatch.setattr(sft, "sft_trainer_class", lambda: Recording)
    summary = sft.train_sft(ctx, dataset, tc, 512, packing=False)
    total = tc.max_steps
    assert summary["train/steps"] == total == len(lrs)
    want = [tc.lr * lr_factor(s, warmup_steps(total, tc.warmup_ratio), total, tc.min_lr_ratio) for s in range(total)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[0] == pytest.approx(tc.lr) and lrs[0] > 0
