"""reward/combined.py against hand-computed numbers."""

import math

import pytest
import torch

from reward.combined import RunningMoments, combine, combined_reward, logit, safety_selected, whiten


def test_logit_inverts_sigmoid_and_never_returns_inf():
    x = torch.tensor([-3.0, 0.0, 2.5])
    assert logit(torch.sigmoid(x)).tolist() == pytest.approx(x.tolist(), abs=1e-5)
    edge = logit(torch.tensor([0.0, 1.0]))
    bound = math.log((1 - 1e-6) / 1e-6)  # 13.8155
    assert torch.isfinite(edge).all()
    assert edge.tolist() == pytest.approx([-bound, bound], rel=1e-4)


def test_combine_selects_on_the_sigmoid_scale():
    rs_raw = torch.tensor([1.0, 1.0, -2.0, -1.7])
    rh_raw = torch.tensor([3.0, 3.0, 3.0, 3.0])
    is_safety = torch.tensor([True, False, False, False])
    rc = combine(rs_raw, rh_raw, is_safety)
    # safety prompt -> Rs; sigmoid(1) = 0.731 >= 0.15 -> Rh; sigmoid(-2) = 0.1192 < 0.15 -> Rs even for
    # a non-safety prompt; sigmoid(-1.7) = 0.1545 >= 0.15 -> Rh
    expected = [
        torch.sigmoid(torch.tensor(1.0)).item(),
        torch.sigmoid(torch.tensor(3.0)).item(),
        0.119203,
        torch.sigmoid(torch.tensor(3.0)).item(),
    ]
    assert rc.tolist() == pytest.approx(expected, abs=1e-6)
    assert safety_selected(rs_raw, is_safety).tolist() == [True, False, True, False]


def test_running_moments_match_the_batch_statistics():
    x = torch.tensor([1.0, 4.0, -2.0, 7.0, 0.5, 3.0])
    mom = RunningMoments()
    for chunk in (x[:1], x[1:4], x[4:]):  # Chan's parallel update, chunk by chunk
        mom.update(chunk)
    assert mom.count == 6
    assert mom.mean == pytest.approx(x.mean().item())
    assert mom.var == pytest.approx(x.var().item())  # unbiased


def test_whiten_hand_computed():
    mom = RunningMoments()
    out = whiten(torch.tensor([1.0, 3.0]), mom)  # mean 2, unbiased var 2
    assert out.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-6)
    out = whiten(torch.tensor([2.0]), mom)  # now [1, 3, 2]: mean 2, var 1 -> 0
    assert out.tolist() == pytest.approx([0.0], abs=1e-6)


def test_whiten_a_batch_of_one_does_not_divide_by_zero():
    mom = RunningMoments()
    out = whiten(torch.tensor([5.0]), mom)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(0.0)
    assert whiten(torch.tensor([5.0]), RunningMoments(), shift_mean=False).item() == pytest.approx(5.0)
    same = RunningMoments()
    whiten(torch.tensor([3.0, 3.0]), same)  # zero spread: var 0, eps keeps it finite
    assert torch.isfinite(whiten(torch.tensor([3.0]), same)).all()


def test_running_moments_state_round_trip():
    a = RunningMoments()
    a.update(torch.tensor([1.0, 2.0, 4.0]))
    b = RunningMoments()
    b.load_state_dict(a.state_dict())
    assert (b.count, b.mean, b.m2) == (a.count, a.mean, a.m2)


def test_combined_reward_hand_computed():
    rs_raw = torch.tensor([0.0, -3.0, 1.0])
    rh_raw = torch.tensor([2.0, 2.0, 2.0])
    is_safety = torch.tensor([True, False, False])
    # selection: Rs (safety prompt), Rs (sigmoid(-3) = 0.047 < 0.15), Rh -> logits 0, -3, 2
    reward, m = combined_reward(rs_raw, rh_raw, is_safety, None, whiten=False)
    assert reward.tolist() == pytest.approx([0.0, -3.0, 2.0], abs=1e-5)
    assert m["reward/safety_share"] == pytest.approx(2 / 3)
    assert m["reward/threshold_share"] == pytest.approx(1 / 3)
    assert m["reward/safety_prompt_share"] == pytest.approx(1 / 3)
    mom = RunningMoments()
    reward, m = combined_reward(rs_raw, rh_raw, is_safety, mom)
    mean, std = -1 / 3, math.sqrt(114 / 18)  # unbiased var of (0, -3, 2) = 114/18
    assert reward.tolist() == pytest.approx([(v - mean) / std for v in (0.0, -3.0, 2.0)], abs=1e-5)
    assert m["reward/running_mean"] == pytest.approx(mean) and m["reward/running_std"] == pytest.approx(std)
    with pytest.raises(ValueError, match="RunningMoments"):
        combined_reward(rs_raw, rh_raw, is_safety, None)


def test_combined_reward_batch_of_one():
    reward, _ = combined_reward(torch.tensor([50.0]), torch.tensor([-50.0]), torch.tensor([False]), RunningMoments())
    assert torch.isfinite(reward).all()


def test_logit_of_combine_recovers_the_raw_score():
    # LOGIT(sigmoid(raw)) == raw up to the eps clamp at 13.8; float64 inside keeps 12 exact
    reward, _ = combined_reward(
        torch.tensor([-12.0, 0.5]), torch.tensor([1.0, 12.0]), torch.tensor([False, False]), None, whiten=False
    )
    assert reward.tolist() == pytest.approx([-12.0, 12.0], abs=1e-4)
