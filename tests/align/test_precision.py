"""align/precision.py: `precision: auto | bf16 | fp32` resolved from the hardware, with the probes patched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align import precision as prec
from align.config import load_config
from align.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def machine(monkeypatch):
    """Set the hardware the resolver sees: machine(units=(...), isa=..., cuda=None | True | False)."""

    def set_(units=(), isa="AVX2", cuda=None, gpu="NVIDIA A100"):
        monkeypatch.setattr(prec, "cpu_bf16_units", lambda: tuple(units))
        monkeypatch.setattr(prec, "cpu_isa", lambda: isa)
        monkeypatch.setattr(prec, "cuda_bf16", lambda: (cuda is not None, bool(cuda), gpu if cuda is not None else ""))

    return set_


@pytest.mark.parametrize(
    "units,isa,name",
    [
        (("AMX",), "AVX512", "bf16"),
        (("AVX512-BF16",), "AVX512", "bf16"),
        (("AMX", "AVX512-BF16"), "AVX512", "bf16"),
        ((), "AVX2", "fp32"),
        ((), "AVX512", "fp32"),  # AVX512 without its BF16 extension emulates bf16
    ],
)
def test_auto_on_cpus(machine, units, isa, name):
    machine(units=units, isa=isa)
    p = prec.resolve_precision("auto")
    assert p.name == name and p.dtype == ("bfloat16" if name == "bf16" else "float32") and p.bf16 == (name == "bf16")
    if units:
        assert p.reason == f"this CPU has bf16 units: {', '.join(units)}"
    else:
        assert p.reason == f"this CPU has no bf16 units: {isa}"
    assert not prec.emulated_bf16(p)


@pytest.mark.parametrize("cuda_bf16,name", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpu_not_the_cpu(machine, cuda_bf16, name):
    machine(units=("AMX",) if not cuda_bf16 else (), cuda=cuda_bf16, gpu="GPU-X")
    p = prec.resolve_precision("auto")
    assert p.name == name
    assert p.reason == ("GPU-X supports bf16" if cuda_bf16 else "GPU-X has no bf16 support")


@pytest.mark.parametrize("setting", ["bf16", "fp32"])
@pytest.mark.parametrize("units", [(), ("AMX",)])
def test_an_explicit_setting_beats_auto(machine, setting, units):
    machine(units=units)
    p = prec.resolve_precision(setting)
    assert p.name == setting and p.reason.startswith("set in the config; ")


def test_forced_bf16_without_bf16_units_warns_with_the_measured_slowdown(machine, monkeypatch):
    machine(units=(), isa="AVX2")
    monkeypatch.setattr(prec, "matmul_gflops", lambda dtype, **kw: {"float32": 112.0, "bfloat16": 0.9}[dtype])
    forced = prec.resolve_precision("bf16")
    assert prec.emulated_bf16(forced)
    w = prec.slow_bf16_warning(forced)
    assert "without bf16 units (AVX2)" in w and "0.9 GFLOP/s against 112.0 in fp32 (124.4x slower)" in w
    assert "precision=auto" in w
    assert prec.slow_bf16_warning(prec.resolve_precision("auto")) == ""
    machine(units=("AMX",))
    assert prec.slow_bf16_warning(prec.resolve_precision("bf16")) == ""


def test_forced_bf16_on_a_gpu_without_it_warns(machine):
    machine(cuda=False)
    assert "GPU without bf16" in prec.slow_bf16_warning(prec.resolve_precision("bf16"))


def test_matmul_gflops_measures_something():
    assert prec.matmul_gflops("float32", size=64, seconds=0.01) > 0


def test_the_config_resolves_once_and_every_stage_hash_sees_it(machine):
    machine(units=("AMX",))
    bf = load_config(ROOT / "configs" / "default.yaml")
    assert bf.precision == "auto" and bf.compute.name == "bf16"
    machine(units=())
    fp = load_config(ROOT / "configs" / "default.yaml")
    assert fp.compute.name == "fp32" and fp.compute.reason == "this CPU has no bf16 units: AVX2"
    # the same config on the other CPU kind is another run: no stage's artifacts are reused
    assert all(bf.stage_hash(s) != fp.stage_hash(s) for s in bf.stages)
    forced = load_config(ROOT / "configs" / "default.yaml", ["precision=bf16"])
    assert forced.compute.name == "bf16" and forced.stage_hash("sft") == bf.stage_hash("sft")


def test_a_bad_precision_names_the_choices():
    with pytest.raises(ConfigError, match=r"precision='fp16': must be one of 'auto', 'bf16', 'fp32'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["precision=fp16"])


@pytest.mark.parametrize(
    "old", ["model.dtype=float32", "rollout.dtype=float32", "sft.train.bf16=false", "ppo.bf16=false"]
)
def test_the_old_per_stage_dtype_keys_are_gone(old):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ROOT / "configs" / "default.yaml", [old])


def test_hardware_line_names_cpu_units_and_precision(machine):
    machine(units=(), isa="AVX2")
    line = prec.hardware_line(prec.resolve_precision("auto"))
    assert "(AVX2; bf16 units: none)" in line and line.endswith("precision: fp32 (this CPU has no bf16 units: AVX2)")


def _run_recording_dtypes(tmp_path, setting: str) -> tuple[set, set, set, list]:
    """Run tiny SFT -> both RMs -> PPO in this process under `precision=setting`; return the dtypes of
    every weight a forward used, of every linear layer's output, of the in-process engine's weights
    (vLLM runs its model here too) and the engine dtypes asked for."""
    from align.pipeline import run_pipeline
    from rollout.base import Engine

    weights, outputs, engines = set(), set(), []

    def hook(module, args, out):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and not isinstance(module, torch.nn.Embedding):
            weights.add(w.dtype)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                outputs.add(out.dtype)

    original = Engine.__init__

    def spy(self, *a, dtype, **kw):
        engines.append(dtype)
        original(self, *a, dtype=dtype, **kw)

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"precision={setting}",
            f"run_dir={tmp_path / setting}",
            "stages=[sft, rm_helpful, rm_safety, ppo]",
            "sft.train.max_steps=1",
            "rm_helpful.train.max_steps=1",
            "rm_safety.train.max_steps=1",
            "ppo.iterations=1",
            "ppo.heldout_prompts=0",
        ],
    )
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    Engine.__init__ = spy
    try:
        manifests = run_pipeline(cfg)
    finally:
        handle.remove()
        Engine.__init__ = original
    assert all(m["precision"]["name"] == setting for m in manifests)
    run = json.loads((tmp_path / setting / "run.json").read_text())
    assert run["precision"]["name"] == setting and run["precision"]["reason"]
    return weights, outputs, engines


@pytest.mark.slow
def test_a_run_under_fp32_computes_in_fp32_everywhere_and_bf16_does_not(tmp_path):
    weights, outputs, engines = _run_recording_dtypes(tmp_path, "fp32")
    assert weights == {torch.float32} and outputs == {torch.float32}
    assert engines and set(engines) == {"float32"}
    # the same spy sees bf16 when it is asked for: frozen LoRA bases, autocast outputs, the engine
    weights, outputs, engines = _run_recording_dtypes(tmp_path, "bf16")
    assert torch.bfloat16 in weights and torch.bfloat16 in outputs
    assert set(engines) == {"bfloat16"}
