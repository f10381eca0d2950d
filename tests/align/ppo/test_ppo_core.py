"""PPO math (align/ppo/core.py) against numbers worked out by hand."""

import math

import pytest
import torch

from align.ppo import core


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_core_imports_only_torch():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(core.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "torch"}, imported


def test_ratio_of_e_is_clipped_to_1_2():
    # log pi - log pi_old = 1: ratio e. With A = +1 the clipped term wins: -min(e, 1.2) = -1.2.
    logp, old, mask = t([1.0]), t([0.0]), torch.tensor([[True]])
    loss, m = core.policy_loss(logp, old, t([1.0]), mask, clip=0.2, num_tokens=1)
    assert loss.item() == pytest.approx(-1.2)
    assert m["ppo/clipfrac"].item() == 1.0
    assert m["ppo/approx_kl"].item() == pytest.approx(math.e - 2)  # (e - 1) - 1
    # With A = -1 the pessimistic (unclipped) term wins: -min(-e, -1.2) = e.
    loss, _ = core.policy_loss(logp, old, t([-1.0]), mask, clip=0.2, num_tokens=1)
    assert loss.item() == pytest.approx(math.e)
    # Inside the clip range the loss is -ratio * A and nothing is clipped.
    loss, m = core.policy_loss(t([math.log(1.1)]), old, t([2.0]), mask, clip=0.2, num_tokens=1)
    assert loss.item() == pytest.approx(-2.2) and m["ppo/clipfrac"].item() == 0.0


def test_policy_loss_gradient_vanishes_when_clipped():
    logp = t([1.0]).requires_grad_()
    loss, _ = core.policy_loss(logp, t([0.0]), t([1.0]), torch.tensor([[True]]), clip=0.2, num_tokens=1)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_gae_three_tokens_by_hand():
    # gamma 0.9, lambda 0.5; rewards [0, 0, 1], values [0.5, 0.6, 0.7]:
    # t=2: delta = 1 - 0.7 = 0.3                         A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03                A1 = 0.03 + 0.45 * 0.3 = 0.165
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04                A0 = 0.04 + 0.45 * 0.165 = 0.11425
    adv, ret = core.gae(t([0, 0, 1.0]), t([0.5, 0.6, 0.7]), torch.tensor([[True, True, True]]), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.11425, 0.165, 0.3])
    assert ret[0].tolist() == pytest.approx([0.61425, 0.765, 1.0])


def test_gae_ignores_what_the_padding_holds():
    # Row of 2 real tokens; junk (99) in the padded slot must not leak into the bootstrap.
    # gamma = lambda = 1: t=1: delta = 2 - 1 = 1, A1 = 1; t=0: delta = 0 + 1 - 1 = 0, A0 = 0 + 1 = 1.
    adv, ret = core.gae(t([0, 2.0, 99.0]), t([1.0, 1.0, 99.0]), torch.tensor([[True, True, False]]), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_per_token_rewards_kl_on_every_token_score_on_the_last():
    # beta 0.1; k1 = logp - ref = [0.5, 0, -1]; r = -0.1 * k1, + score 1.0 on the last token.
    logp, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -2.0, -2.0])
    r, kl = core.per_token_rewards(torch.tensor([1.0]), logp, ref, torch.tensor([[True, True, True]]), 0.1)
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, -1.0])
    assert r[0].tolist() == pytest.approx([-0.05, 0.0, 1.1])
    # A row that ended after 2 tokens: the score goes on token 1, the padded token gets nothing.
    r, kl = core.per_token_rewards(torch.tensor([1.0]), logp, ref, torch.tensor([[True, True, False]]), 0.1)
    assert r[0].tolist() == pytest.approx([-0.05, 1.0, 0.0]) and kl[0, 2] == 0


def test_kl_estimators():
    logp, ref = t([0.0]), t([math.log(0.5)])
    assert core.kl_k1(logp, ref).item() == pytest.approx(-math.log(0.5))
    # k3 = (r - 1) - log r with r = 0.5: -0.5 + log 2
    assert core.kl_k3(logp, ref).item() == pytest.approx(-0.5 + math.log(2))
    assert (core.kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_value_loss_clipped_by_hand():
    mask = torch.tensor([[True]])
    # V 1.0 from V_old 0.0, target 2, clip 0.2: clipped V = 0.2, errors 1 and 3.24 -> 0.5 * 3.24
    loss, m = core.value_loss(t([1.0]), t([0.0]), t([2.0]), mask, clip=0.2, num_tokens=1)
    assert loss.item() == pytest.approx(1.62) and m["ppo/value_clipfrac"].item() == 1.0
    # Within the clip range: plain 0.5 * (V - R)^2
    loss, m = core.value_loss(t([1.0]), t([0.9]), t([2.0]), mask, clip=0.2, num_tokens=1)
    assert loss.item() == pytest.approx(0.5) and m["ppo/value_clipfrac"].item() == 0.0


def test_masked_whiten_and_moments():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([[True, True, True, False]])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert core.masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert core.masked_whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert core.masked_whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_explained_variance():
    ret, mask = t([1.0, 2.0, 4.0]), torch.ones(1, 3, dtype=torch.bool)
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 7.0), ret, mask).item() == pytest.approx(0.0, abs=1e-6)
    # values [1, 2, 3] vs returns [1, 2, 4]: residuals [0, 0, 1], var 1/3; var(returns) 7/3 -> 1 - 1/7
    assert core.explained_variance(t([1.0, 2.0, 3.0]), ret, mask).item() == pytest.approx(6 / 7)


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert core.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert core.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    half = torch.tensor([[[1.0, -3.0]]], dtype=torch.bfloat16)
    assert core.temper(half, 1.0).dtype == torch.float32 and core.temper(half, 1.0).tolist() == [[[1.0, -3.0]]]
    assert core.temper(half, 2.0).tolist() == [[[0.5, -1.5]]]
    z, tok = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    lp, ent = core.logprobs_and_entropy(z, tok)
    torch.testing.assert_close(lp, core.logprobs_from_logits(z, tok))
    torch.testing.assert_close(ent, core.entropy_from_logits(z))


def test_aggregate_is_split_invariant():
    """Shards (processes x micro-batches) of a mini-batch sum to the mini-batch's token mean."""
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    x = torch.randn(B, T, generator=g)
    lengths = torch.tensor([1, 6, 2, 5, 3, 6, 1, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    n = int(mask.sum())
    full = core.aggregate(x, mask, n)
    assert full.item() == pytest.approx(x[mask].mean().item())
    for world, micro in ((1, 8), (2, 4), (2, 1), (4, 2), (8, 1)):
        shards = []
        per_rank = B // world
        for rank in range(world):
            rows = range(rank * per_rank, (rank + 1) * per_rank)
            for k in range(0, per_rank, micro):
                idx = list(rows)[k : k + micro]
                shards.append(core.aggregate(x[idx], mask[idx], n))
        assert sum(shards).item() == pytest.approx(full.item(), abs=1e-6), (world, micro)
    # ...whereas averaging per-shard means would not (uneven lengths): the test can fail.
    halves = [core.masked_mean(x[:2], mask[:2]), core.masked_mean(x[2:], mask[2:])]  # 7 vs 21 tokens
    assert abs((halves[0] + halves[1]).item() / 2 - full.item()) > 1e-3


def test_policy_loss_gradient_is_split_invariant():
    g = torch.Generator().manual_seed(1)
    B, T = 6, 5
    logp = torch.randn(B, T, generator=g) * 0.1
    old, adv = torch.randn(B, T, generator=g) * 0.1, torch.randn(B, T, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 1, 3, 2, 5, 4])[:, None]
    n = int(mask.sum())
    w = logp.clone().requires_grad_()
    core.policy_loss(w, old, adv, mask, 0.2, n)[0].backward()
    full_grad = w.grad.clone()
    w.grad = None
    for idx in ([0, 1], [2, 3, 4], [5]):
        core.policy_loss(w[idx], old[idx], adv[idx], mask[idx], 0.2, n)[0].backward()
    assert torch.allclose(w.grad, full_grad, atol=1e-7)


def test_trajectory_checks_shapes_and_selects_rows():
    B, P, T = 4, 3, 5
    z = torch.zeros(B, T)
    traj = core.Trajectory(
        input_ids=torch.zeros(B, P + T, dtype=torch.long),
        attention_mask=torch.ones(B, P + T, dtype=torch.bool),
        response_mask=torch.ones(B, T, dtype=torch.bool),
        logprobs=z,
        ref_logprobs=z,
        values=z,
        rewards=z,
        advantages=torch.arange(B * T, dtype=torch.float32).view(B, T),
        returns=z,
        scores=torch.zeros(B),
    )
    assert traj.prompt_len == P and len(traj) == B
    sub = traj.select([3, 1])
    assert len(sub) == 2 and sub.advantages[0, 0].item() == 15.0
    with pytest.raises(ValueError, match="values"):
        core.Trajectory(**{**traj.state_dict(), "values": torch.zeros(B, T + 1)})
