"""`align.models.compile_layers` and the compiled vocabulary reductions of PPO: the same numbers as eager.

torch.compile (inductor, a C++ compiler on this CPU) runs for real here; the tiny GQA model keeps the
one-off compile to seconds.
"""

from __future__ import annotations

import pytest
import torch

from align.models import compile_layers, cpp_compiler, decoder_layers, load_causal_lm

pytestmark = pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler")


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # a left-padded row
    return ids, attn


def test_compiled_layers_give_eager_logits_and_gradients(tiny_dir):
    eager, compiled = load_causal_lm(tiny_dir), load_causal_lm(tiny_dir)
    n = compile_layers(compiled)
    assert n == eager.config.num_hidden_layers and n == len(decoder_layers(compiled))
    for seed in (0, 1):  # a second batch of the same shape reuses the graph
        ids, attn = _batch(seed)
        out = [m(input_ids=ids, attention_mask=attn, use_cache=False).logits for m in (eager, compiled)]
        keep = attn.bool()
        torch.testing.assert_close(out[1][keep], out[0][keep], atol=1e-5, rtol=1e-5)
        for m, o in zip((eager, compiled), out):
            m.zero_grad()
            o[keep].logsumexp(-1).sum().backward()
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    # another length: dynamic shapes, no error and the same numbers
    ids, attn = _batch(2)
    ids, attn = ids[:, :7], attn[:, :7]
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=attn).logits
        b = compiled(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(b[attn.bool()], a[attn.bool()], atol=1e-5, rtol=1e-5)
    # the state dict is the model's own: a compiled model saves and reloads as the plain one
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_compile_off_or_without_a_compiler_runs_eager(tiny_dir, monkeypatch, capsys):
    import align.models as models

    model = load_causal_lm(tiny_dir)
    assert compile_layers(model, enabled=False) == 0
    monkeypatch.setattr(models, "cpp_compiler", lambda: None)
    assert compile_layers(model) == 0
    assert "no C++ compiler found" in capsys.readouterr().out
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in decoder_layers(model))


def test_compile_is_one_process_only():
    from align.config import PPOConfig, TrainConfig
    from align.configlib import build
    from align.configlib import ConfigError

    with pytest.raises(ConfigError, match="compile"):
        build(TrainConfig, {"compile": True, "num_processes": 2, "batch_size": 16})
    with pytest.raises(ConfigError, match="compile"):
        build(
            PPOConfig,
            {
                "compile": True,
                "num_processes": 2,
                "prompts": [{"format": "synthetic_prompts"}],
                "lora": {"enabled": True},
            },
        )


def test_compiled_vocab_reductions_equal_eager():
    from align.ppo.train import vocab_fns

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 300, generator=g)).to(torch.bfloat16)
    tokens = torch.randint(0, 300, (2, 5), generator=g)
    (lp_e, both_e), (lp_c, both_c) = vocab_fns(False), vocab_fns(True)
    for t in (1.0, 0.7):
        torch.testing.assert_close(lp_c(logits, tokens, t), lp_e(logits, tokens, t), atol=1e-5, rtol=1e-5)
        for c, e in zip(both_c(logits, tokens, t), both_e(logits, tokens, t)):
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    # with gradients (the PPO loss)
    x_e = logits.float().requires_grad_(True)
    x_c = logits.float().requires_grad_(True)
    lp_e(x_e, tokens, 1.0).sum().backward()
    lp_c(x_c, tokens, 1.0).sum().backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, atol=1e-6, rtol=1e-5)


def test_compiled_ppo_trajectory_and_update_equal_eager(tiny_dir):
    """make_trajectory and ppo_update with ppo.compile: the eager numbers, and at the start (adapters
    zero) the reference log-probs equal the policy's exactly, as eager."""
    from align.config import PPOConfig
    from align.configlib import build
    from align.ppo.policy import build_policy, torch_learner
    from align.ppo.train import build_batch, make_trajectory, ppo_update

    base = {
        "prompts": [{"format": "synthetic_prompts"}],
        "prompts_per_iteration": 4,
        "mini_batch_size": 2,
        "micro_batch_size": 2,
        "lr": 1e-2,
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "vf_coef": 0.5,
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 7, 5, 9)]
    responses = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 2, 8, 4)]
    ids, attn, resp = build_batch(prompts, responses, pad_id=0)
    scores = torch.tensor([0.5, -1.0, 2.0, -0.3])
    results = []
    for compile in (False, True):
        cfg = build(PPOConfig, {**base, "compile": compile})
        learner = torch_learner(build_policy(tiny_dir, cfg.lora, "float32", seed=0), cfg)
        compile_layers(learner.net, compile)
        traj, _ = make_trajectory(learner, ids, attn, resp, torch.zeros(resp.shape), scores, cfg, autocast=False)
        assert torch.equal(traj.logprobs, traj.ref_logprobs)
        _, steps = ppo_update(learner, traj, cfg, seed=1, autocast=False, iteration=1)
        results.append((traj, steps))
    (te, se), (tc, sc) = results
    for name in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(tc, name), getattr(te, name), atol=1e-5, rtol=1e-4, msg=name)
    assert len(sc) == len(se) == 2
    for a, b in zip(se, sc):
        for name in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name


def test_compiled_layers_with_packed_attention_equal_eager(tiny_dir):
    """SFT's packed rows (align_varlen: a data-dependent split the compiled layer runs eager) under
    `train.compile`: the same loss and gradients."""
    from align.attention import use_varlen

    lengths = (7, 12, 5)
    g = torch.Generator().manual_seed(0)
    models = [load_causal_lm(tiny_dir), load_causal_lm(tiny_dir)]
    for m in models:
        assert use_varlen(m)
    compile_layers(models[1])
    ids = torch.randint(3, models[0].config.vocab_size, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    losses = []
    for m in models:
        out = m(
            input_ids=ids,
            position_ids=pos,
            labels=ids,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        )
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
