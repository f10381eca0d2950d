"""align/schedule.py against numbers worked out by hand, and the shipped configs' schedules unchanged."""

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
    assert f[5] == pytest.approx(0.1 + 0.45 * (1 + math.cos(3 * math.pi / 7)))
    assert f[5] == pytest.approx(0.6501, abs=1e-4)
    assert f[9] == pytest.approx(0.1)  # the floor, at the last step
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(0, 0, 1, 0.1) == pytest.approx(1.0)  # no warm-up, a single step: the peak
    assert lr_factor(50, 2, 10, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def test_constant_is_no_warmup_and_a_floor_of_one():
    assert [lr_factor(s, 0, 5, 1.0) for s in range(5)] == [1.0] * 5


def test_transformers_convention():
    # warm-up 1 of 6 steps, floor 0: 0, then cos over progress (s - 1) / 5
    f = [lr_factor(s, 1, 6, 0.0, zero_first_step=True) for s in range(6)]
    assert f == pytest.approx([0.0, 1.0, 0.904508, 0.654508, 0.345492, 0.095492], abs=1e-6)
    assert lr_factor(6, 1, 6, 0.2, zero_first_step=True) == pytest.approx(0.2)  # one step after the last


def test_warmup_steps_round_up():
    assert warmup_steps(6, 0.03) == 1 and warmup_steps(120, 0.03) == 4 and warmup_steps(100, 0.0) == 0


def _hf_schedule(total: int, warmup_ratio: float, min_ratio: float) -> list[float]:
    """The multipliers HF Trainer's cosine schedules give, as SFT set them up before align/schedule.py."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kind, kwargs = ("cosine_with_min_lr", {"min_lr_rate": min_ratio}) if min_ratio > 0 else ("cosine", {})
    sched = get_scheduler(
        kind,
        opt,
        num_warmup_steps=math.ceil(total * warmup_ratio),
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_shipped_sft_style_schedules_match_transformers():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    # default.yaml: sft 6 steps, rejection sampling 4, gatt 160; each with warm-up 0.03 and floor 0.
    for tc in (cfg.sft.train, cfg.rejection_sampling.train, cfg.gatt.train):
        total = tc.max_steps
        ours = [
            lr_factor(s, warmup_steps(total, tc.warmup_ratio), total, tc.min_lr_ratio, zero_first_step=True)
            for s in range(total)
        ]
        assert ours == pytest.approx(_hf_schedule(total, tc.warmup_ratio, tc.min_lr_ratio), abs=1e-9)
    # and with a floor, as cosine_with_min_lr
    assert [lr_factor(s, 2, 20, 0.1, zero_first_step=True) for s in range(20)] == pytest.approx(
        _hf_schedule(20, 0.1, 0.1), abs=1e-9
    )


def test_shipped_reward_model_schedules():
    """The reward models' multipliers for configs/default.yaml, step by step, as the RM trainer gave them
    before align/schedule.py (reward/train.py's lr_factor): rm_helpful 120 steps, rm_safety 60, both
    warm-up 0.03 (4 and 2 steps) and floor 0.1."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    h, s = cfg.rm_helpful.train, cfg.rm_safety.train
    fh = [lr_factor(i, warmup_steps(h.max_steps, h.warmup_ratio), h.max_steps, h.min_lr_ratio) for i in range(120)]
    fs = [lr_factor(i, warmup_steps(s.max_steps, s.warmup_ratio), s.max_steps, s.min_lr_ratio) for i in range(60)]
    assert fh[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 115))])
    assert fh[61] == pytest.approx(0.1 + 0.45 * (1 + math.cos(57 * math.pi / 115)))
    assert fh[119] == pytest.approx(0.1)
    assert fs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert fs[30] == pytest.approx(0.1 + 0.45 * (1 + math.cos(28 * math.pi / 57)))
    assert fs[59] == pytest.approx(0.1)
