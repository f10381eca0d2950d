"""reward/losses.py against hand-computed numbers."""

import math

import pytest
import torch

from reward.losses import (
    MARGIN_TABLES,
    RATING_LEVELS,
    accuracy_by_level,
    margin_table,
    margins_for,
    ranking_loss,
    safety_aux_loss,
)


def test_rating_levels_match_the_schema():
    from align.data.schema import RATINGS

    assert RATING_LEVELS == RATINGS


def test_margin_tables_are_table_27():
    assert MARGIN_TABLES["none"] == (0, 0, 0, 0)
    assert MARGIN_TABLES["small"] == pytest.approx((1, 2 / 3, 1 / 3, 0))
    assert MARGIN_TABLES["large"] == (3, 2, 1, 0)


def test_margins_for_named_and_custom_tables():
    idx = torch.tensor([0, 1, 2, 3, 0])
    assert margins_for(idx, "large").tolist() == [3, 2, 1, 0, 3]
    assert margins_for(idx, "small").tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0, 1])
    assert margins_for(idx, "none").tolist() == [0, 0, 0, 0, 0]
    assert margins_for(idx, [4, 3, 2, 1]).tolist() == [4, 3, 2, 1, 4]
    with pytest.raises(ValueError, match="4 margins"):
        margin_table([1, 2])
    with pytest.raises(ValueError, match="must be one of"):
        margin_table("medium")


def test_ranking_loss_hand_computed():
    # gap 1, margin 1: -log sigmoid(0) = log 2
    loss, m = ranking_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rm/accuracy"] == 1.0 and m["rm/margin_mean"] == 1.0 and m["rm/reward_gap"] == 1.0
    # gap 2, no margin: log(1 + e^-2) = 0.126928
    loss, _ = ranking_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    # mean over the batch: (log 2 + 0.126928) / 2
    loss, m = ranking_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(2) + 0.126928) / 2, abs=1e-6)
    assert m["rm/margin_mean"] == 0.5


def test_ranking_loss_is_stable_for_huge_gaps():
    loss, _ = ranking_loss(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(500.0)


def test_ranking_loss_gradient():
    # d/dr_c of -log sigmoid(r_c - r_r - m) = -sigmoid(-(gap - m)) = -0.5 at gap == m; mean over B=2
    r_c = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, _ = ranking_loss(r_c, torch.zeros(2), torch.ones(2))
    loss.backward()
    assert r_c.grad.tolist() == pytest.approx([-0.25, -0.25])


def test_ties_count_as_wrong():
    _, m = ranking_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert m["rm/accuracy"] == 0.5


def test_splitting_a_batch_with_denom_gives_the_full_batch_loss():
    g = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(6, generator=g), torch.randn(6, generator=g)
    margin = margins_for(torch.tensor([0, 1, 2, 3, 0, 1]), "large")
    full, _ = ranking_loss(r_c, r_r, margin)
    parts = [ranking_loss(r_c[s], r_r[s], margin[s], denom=6)[0] for s in (slice(0, 1), slice(1, 6))]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


def test_safety_aux_loss_hand_computed():
    rewards = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    is_safe = torch.tensor([True, False, True])
    labelled = torch.tensor([True, True, False])  # the third label is unknown: no term
    loss, m = safety_aux_loss(rewards, is_safe, labelled)
    # safe r=0: -log sigmoid(0) = log 2; unsafe r=2: -log sigmoid(-2) = log(1 + e^2) = 2.126928
    assert loss.item() == pytest.approx((math.log(2) + 2.126928) / 2, abs=1e-6)
    assert m["rm/unsafe_recall"] == 0.0  # the unsafe response scored 2 > 0: not caught
    assert m["rm/safety_labelled"] == 2 and m["rm/unsafe_count"] == 1
    loss.backward()
    # safe: d/dr = -sigmoid(-r)/2 = -0.25; unsafe: +sigmoid(r)/2 = 0.440399; unknown: 0
    assert rewards.grad.tolist() == pytest.approx([-0.25, 0.440399, 0.0], abs=1e-6)


def test_safety_aux_loss_unsafe_below_zero_is_recalled():
    _, m = safety_aux_loss(torch.tensor([-0.5, 0.5]), torch.tensor([False, False]), torch.tensor([True, True]))
    assert m["rm/unsafe_recall"] == 0.5


def test_safety_aux_loss_without_labels_is_zero_and_differentiable():
    r = torch.tensor([1.0, -1.0], requires_grad=True)
    loss, m = safety_aux_loss(r, torch.tensor([True, False]), torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and r.grad.tolist() == [0.0, 0.0] and m["rm/unsafe_recall"] == 0.0


def test_accuracy_by_level():
    r_c = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0])
    r_r = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0])
    lvl = torch.tensor([0, 0, 1, 1, 3])
    acc = accuracy_by_level(r_c, r_r, lvl)
    assert acc["rm/accuracy"] == pytest.approx(2 / 5)
    assert acc["rm/accuracy/significantly_better"] == 0.5
    assert acc["rm/accuracy/better"] == 0.5
    assert acc["rm/accuracy/negligibly_better"] == 0.0  # a tie
    assert "rm/accuracy/slightly_better" not in acc  # no pair at that level: left out, not NaN
    assert acc["rm/count/significantly_better"] == 2
