"""Generation engines (vLLM, transformers) behind one interface, and weight sync from training.

    from rollout import SamplingParams, make_engine

    with make_engine(cfg.rollout, model_dir, seed=cfg.seed, dtype=cfg.compute.dtype) as engine:
        rollouts = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=128, seed=0))
        seconds = engine.update_weights(policy_model)

Importing this package loads neither vLLM nor transformers; `make_engine` loads the one it builds.
"""

from __future__ import annotations

from pathlib import Path

from rollout.base import Engine, Prompt
from rollout.types import Rollouts, SamplingParams, Timing

__all__ = ["Engine", "Prompt", "Rollouts", "SamplingParams", "Timing", "make_engine", "push_weights"]


def make_engine(cfg, model_dir: str | Path, seed: int = 0, *, dtype: str, slot: tuple[int, int] = (0, 1)) -> Engine:
    """The engine `cfg.engine` names (a `RolloutConfig`), loaded from the HF directory `model_dir` with
    its weights in `dtype` (bfloat16 | float32: the run's precision, `PipelineConfig.compute.dtype`).

    ``slot`` (i, k): this is the i-th of k engines on this machine (`rollout.replicas`): a vLLM engine on
    CPU takes the i-th of k equal shares of the CPUs; on GPUs it sits beside its rank (docs/gpu.md).

    vLLM start-up spawns processes (spawn start method): call it under
    `if __name__ == "__main__":` in scripts."""
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, model_dir, seed, dtype=dtype, slot=slot)
    if cfg.engine == "transformers":
        from rollout.hf_engine import HFEngine

        return HFEngine(cfg, model_dir, seed, dtype=dtype)
    raise ValueError(f"rollout.engine={cfg.engine!r}: must be 'vllm' or 'transformers'")


def push_weights(engine: Engine | None, model) -> float:
    """Push `model`'s weights into `engine`; returns seconds.

    Under DeepSpeed ZeRO-3 every rank must call this (the gather is collective): the rank that owns the
    engine passes it, the others pass None and only take part in the gather."""
    if engine is not None:
        return engine.update_weights(model)
    import time

    from rollout.weights import hf_state_dict

    start = time.perf_counter()
    hf_state_dict(model, keep=False)
    return time.perf_counter() - start
