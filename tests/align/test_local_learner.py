"""align/launch/local.py: the one-process learner, with float32 weights and with bf16 weights + fp32 masters."""

import torch

from align.launch.local import AdamW, LocalLearner

ADAMW = AdamW(lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))


def _steps(learner, n_steps=3, micro=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        for j in range(micro):
            x = torch.randn(4, 8, generator=g)
            out = learner.module(x.to(next(learner.module.parameters()).dtype)).float()
            learner.accumulate((out**2).mean() / micro, boundary=j == micro - 1)


def test_weight_decay_skips_1d_tensors():
    opt = ADAMW.build(_net().parameters())
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]  # 2 matrices; 2 biases + norm weight and bias
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_bf16_weights_train_fp32_masters_close_to_fp32_training():
    full = LocalLearner(_net(), ADAMW, max_grad_norm=1.0)
    half = LocalLearner(_net(), ADAMW, max_grad_norm=1.0, bf16_weights=True)
    assert all(p.dtype == torch.bfloat16 for p in half.net.parameters())
    assert all(m.dtype == torch.float32 for m in half.masters)
    before = half.trainable_state()
    _steps(full)
    _steps(half)
    after = half.trainable_state()
    assert all(t.dtype == torch.float32 for t in after.values())
    # the bf16 model holds the masters rounded to bf16
    for p, m in zip(half.params, half.masters):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    # lr 1e-2 for 3 steps moves every weight; fp32 and bf16 runs agree to bf16 precision
    ref = full.trainable_state()
    for n in after:
        assert not torch.equal(after[n], before[n]), n
        torch.testing.assert_close(after[n], ref[n], atol=2e-2, rtol=2e-2)
    net = half.full_precision_net()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), after[n])


def test_bf16_weights_accumulate_gradients_in_float32():
    learner = LocalLearner(_net(), ADAMW, max_grad_norm=1e9, bf16_weights=True)
    x = torch.randn(4, 8)
    learner.accumulate(learner.module(x.bfloat16()).float().sum(), boundary=False)
    assert all(p.grad is None for p in learner.params)  # moved into the masters
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in learner.masters)


def test_bf16_weights_keep_frozen_weights_fixed_in_bf16():
    net = _net()
    net[0].weight.requires_grad_(False)
    before = net[0].weight.detach().clone()
    learner = LocalLearner(net, ADAMW, 1.0, bf16_weights=True)
    assert "0.weight" not in learner.trainable_state()
    _steps(learner, n_steps=2)
    assert torch.equal(learner.full_precision_net()[0].weight, before.bfloat16().float())  # rounded once, never trained


def test_bf16_weights_save_load_round_trip(tmp_path):
    a = LocalLearner(_net(), ADAMW, 1.0, bf16_weights=True)
    _steps(a, n_steps=1)
    a.save(tmp_path)
    b = LocalLearner(_net(seed=5), ADAMW, 1.0, bf16_weights=True)
    b.load(tmp_path)
    for n, t in a.trainable_state().items():
        assert torch.equal(b.trainable_state()[n], t)
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
    _steps(a, n_steps=1)
    _steps(b, n_steps=1)  # the optimizer state came back too: the next step is the same
    for n, t in a.trainable_state().items():
        assert torch.equal(b.trainable_state()[n], t)


def test_a_non_finite_gradient_steps_nothing():
    learner = LocalLearner(_net(), ADAMW, 1.0, bf16_weights=True)
    before = learner.trainable_state()
    out = learner.module(torch.randn(4, 8).bfloat16()).float().sum() * float("nan")
    norm = learner.accumulate(out, boundary=True)
    assert norm != norm  # NaN
    assert all(torch.equal(t, before[n]) for n, t in learner.trainable_state().items())
    assert all(m.grad is None for m in learner.masters)
