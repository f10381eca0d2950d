"""The run's numeric precision, chosen from the hardware: the top-level `precision: auto | bf16 | fp32`.

One setting gives every stage its compute dtype (autocast, DeepSpeed's bf16 mode), the frozen weights'
dtype (LoRA bases, reward models that only score) and the rollout engine's dtype. `auto` picks bf16
where the hardware runs it natively and fp32 elsewhere:
- CUDA: bf16 where `torch.cuda.is_bf16_supported()` (Ampere and later); fp32 on older GPUs (fp16
  would need loss scaling, which no stage here implements).
- CPU: bf16 with AMX or AVX512-BF16 units (bf16 matmuls ~4x fp32); fp32 without them, where bf16 is
  emulated and slower than fp32 (bench/README.md has the measured ratios per CPU).
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SETTINGS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is bf16 or fp32, `reason` why (printed once and kept in run.json)."""

    name: Literal["bf16", "fp32"]
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def dtype(self) -> str:
        """The dtype name transformers and vLLM take: bfloat16 or float32."""
        return "bfloat16" if self.bf16 else "float32"

    def line(self) -> str:
        return f"precision: {self.name} ({self.reason})"

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "reason": self.reason}


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> tuple[str, ...]:
    """The bf16 matrix units this CPU has (and the OS enables): a subset of ("AMX", "AVX512-BF16")."""
    import torch

    units = []
    if torch.cpu._is_amx_tile_supported():
        units.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        units.append("AVX512-BF16")
    return tuple(units)


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The widest vector ISA torch dispatches to here: AVX512, AVX2, ... (torch's own probe)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as lscpu shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def cuda_bf16() -> tuple[bool, bool, str]:
    """(CUDA available, bf16 supported on it, device name); probed once per process."""
    import torch

    if not torch.cuda.is_available():
        return False, False, ""
    return True, bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0)


def hardware() -> dict:
    """What decides the precision, for benchmark output and manifests."""
    cuda, cuda_bf, gpu = cuda_bf16()
    out = {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpu_bf16_units": list(cpu_bf16_units()) or "none"}
    if cuda:
        out.update(gpu=gpu, gpu_bf16=cuda_bf)
    return out


def resolve_precision(setting: str) -> Precision:
    """The precision a setting means on this machine (auto: from the hardware; bf16/fp32: as set)."""
    if setting not in SETTINGS:
        raise ValueError(f"precision={setting!r}: must be one of {', '.join(SETTINGS)}")
    cuda, cuda_bf, gpu = cuda_bf16()
    if cuda:
        native = f"{gpu} supports bf16" if cuda_bf else f"{gpu} has no bf16 support"
        if setting == "auto":
            return Precision("bf16" if cuda_bf else "fp32", native)
        return Precision(setting, f"set in the config; {native}")
    units = cpu_bf16_units()
    native = f"this CPU has bf16 units: {', '.join(units)}" if units else f"this CPU has no bf16 units: {cpu_isa()}"
    if setting == "auto":
        return Precision("bf16" if units else "fp32", native)
    return Precision(setting, f"set in the config; {native}")


def emulated_bf16(precision: Precision) -> bool:
    """True when bf16 was forced on hardware that only emulates it."""
    if not precision.bf16:
        return False
    cuda, cuda_bf, _ = cuda_bf16()
    return (cuda and not cuda_bf) or (not cuda and not cpu_bf16_units())


def matmul_gflops(dtype_name: str, size: int = 256, seconds: float = 0.2) -> float:
    """GFLOP/s of a (size x size) matmul in `dtype_name` on the current threads, over ~`seconds`."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e9


def slow_bf16_warning(precision: Precision) -> str:
    """The warning for bf16 forced where it is emulated, with the slowdown measured now ('' if none)."""
    if not emulated_bf16(precision):
        return ""
    cuda, _, _ = cuda_bf16()
    if cuda:
        return (
            "warning: precision=bf16 on a GPU without bf16 support runs emulated and slower than fp32; "
            "set precision=auto (fp32 here)"
        )
    fp32, bf16 = matmul_gflops("float32"), matmul_gflops("bfloat16")
    return (
        f"warning: precision=bf16 on a CPU without bf16 units ({cpu_isa()}): bf16 is emulated, measured now "
        f"{bf16:.1f} GFLOP/s against {fp32:.1f} in fp32 ({fp32 / max(bf16, 1e-9):.1f}x slower); "
        f"set precision=auto (fp32 here)"
    )


def cpu_line(hw: dict) -> str:
    """``Intel(R) Xeon(R) Processor (AVX512; bf16 units: amx_bf16, avx512_bf16)`` from `hardware()`."""
    units = ", ".join(hw["cpu_bf16_units"]) if isinstance(hw["cpu_bf16_units"], list) else "none"
    return f"{hw['cpu']} ({hw['cpu_isa']}; bf16 units: {units})"


def hardware_line(precision: Precision) -> str:
    """One line for benchmark output: the CPU (or GPU), its bf16 capability and the precision."""
    hw = hardware()
    gpu = f"; GPU {hw['gpu']} (bf16: {'yes' if hw['gpu_bf16'] else 'no'})" if "gpu" in hw else ""
    return f"CPU {cpu_line(hw)}{gpu}; {precision.line()}"
