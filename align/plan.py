"""`align plan CONFIG`: each stage's estimated memory per GPU before anything launches, and a refusal
naming the key to change when a stage cannot fit.

Sizes come from the model's architecture (hidden size, layers, heads, kv heads, vocabulary,
intermediate size), read from its config.json, so a 70B plan needs no weights. Pure functions of an
`Arch` and a stage's settings; the byte counts per parameter are those of the training set-up
(docs/gpu.md, "Memory model"):
- full fine-tuning: 16 bytes a parameter (bf16 weights and gradients + fp32 masters and two Adam
  moments under DeepSpeed's bf16 mode; fp32 weights, gradients and two moments in fp32), divided over
  the ranks by ZeRO-3;
- LoRA: the frozen base in the compute dtype (sharded by ZeRO-3) + 16 bytes per adapter parameter;
- ZeRO-3 gathers a layer's full weights while it computes and prefetches the next: two layers;
- activations: per token per decoder layer ~(10 h + 3 kv + 4 i) values (8 h in fp32, where the norms'
  fp32 upcasts are no copies), one layer's worth plus the layer inputs with activation checkpointing,
  and the logits over the vocabulary (compute dtype + 8 bytes of fp32 loss tensors per entry);
- the vLLM engine on a GPU takes `gpu_memory_utilization` of it while awake: its weights / tensor
  parallelism, the KV cache in the rest (2 x layers x kv heads x head dim per token, split by tp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from align.config import replica_spacing
from align.configlib import ConfigError

GiB = float(1 << 30)
ENGINE_RESERVE = 1 * GiB  # vLLM's activations, CUDA graphs and sampler buffers inside its share


@dataclass(frozen=True)
class Arch:
    """A decoder-only (Llama-class) architecture."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int
    tied: bool = False
    head_dim: int = 0  # 0 = hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o, the gated MLP and two norms."""
        h = self.hidden
        attn = h * self.heads * self.hd + 2 * h * self.kv_dim + self.heads * self.hd * h
        return attn + 3 * h * self.intermediate + 2 * h

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """Adapter parameters: r x (fan_in + fan_out) per targeted projection per layer."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_dim, self.intermediate
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return self.layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> float:
        """KV cache per token on one GPU: keys and values of every layer; kv heads split over tp
        (replicated where tp exceeds them, as vLLM does)."""
        kv_per_gpu = max(1.0, self.kv_heads / tp)
        return 2 * self.layers * kv_per_gpu * self.hd * dtype_bytes


# Public config.json values of the two recipe models (Touvron et al., 2023; meta-llama/Llama-2-*-hf):
# used when model.path is absent, so the recipe configs can be planned without their weights.
LLAMA2_7B = Arch(hidden=4096, layers=32, heads=32, kv_heads=32, vocab=32000, intermediate=11008)
LLAMA2_70B = Arch(hidden=8192, layers=80, heads=64, kv_heads=8, vocab=32000, intermediate=28672)
KNOWN = {"70b": LLAMA2_70B, "7b": LLAMA2_7B}  # matched in the model path's name, longest first


def arch_from_config(c: dict) -> Arch:
    """An `Arch` from an HF config.json mapping (Llama, Mistral, Qwen2 key names)."""
    try:
        return Arch(
            hidden=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=int(c["num_attention_heads"]),
            kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
            vocab=int(c["vocab_size"]),
            intermediate=int(c["intermediate_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            head_dim=int(c.get("head_dim") or 0),
        )
    except KeyError as e:
        raise ConfigError(f"model config.json has no {e.args[0]!r}: not a Llama-class decoder") from None


def model_arch(model_cfg) -> tuple[Arch, str]:
    """(architecture, where it came from) of a `ModelConfig`."""
    from align.models import embedded_model_dir, tiny_model_dir

    if model_cfg.source == "tiny":
        path = tiny_model_dir()
    elif model_cfg.source == "embedded":
        path = embedded_model_dir()
    else:
        path = Path(model_cfg.path)
    config = path / "config.json"
    if config.is_file():
        return arch_from_config(json.loads(config.read_text())), str(config)
    name = path.name.lower()
    for key, arch in KNOWN.items():
        if key in name:
            return arch, f"built-in Llama-2-{key.upper()} ({path} not found)"
    raise ConfigError(
        f"model.path={model_cfg.path!r}: no config.json there, and the name matches no built-in "
        f"architecture ({', '.join(KNOWN)}); point model.path at the model's HF directory"
    )


# --------------------------------------------------------------------------------------- estimates
def activation_bytes(
    arch: Arch, sequences: int, seq_len: int, dtype_bytes: int, checkpointing: bool, logits: bool = True
) -> float:
    """Activations kept for the backward of one micro-batch of `sequences` x `seq_len` tokens."""
    tokens = sequences * seq_len
    per_value = 10 * arch.hidden if dtype_bytes < 4 else 8 * arch.hidden
    layer = tokens * dtype_bytes * (per_value + 3 * arch.kv_dim + 4 * arch.intermediate)
    kept = (tokens * dtype_bytes * arch.hidden * arch.layers + layer) if checkpointing else layer * arch.layers
    head = tokens * arch.vocab * (dtype_bytes + 8) if logits else 0
    return kept + head


def training_memory(
    arch: Arch,
    *,
    processes: int,
    micro_batch: int,
    seq_len: int,
    dtype_bytes: int,
    checkpointing: bool,
    lora_r: int = 0,
    lora_targets: tuple[str, ...] = (),
    sequences_per_sample: int = 1,
    logits: bool = True,
) -> dict[str, float]:
    """Bytes per GPU of one training rank, by component. `processes` > 1 = ZeRO-3 over them."""
    P = arch.params()
    n = processes
    out: dict[str, float] = {}
    if lora_r:
        out["frozen weights"] = dtype_bytes * P / n
        out["LoRA weights+grads+Adam"] = 16 * arch.lora_params(lora_r, lora_targets) / n
    else:
        out["weights+grads+Adam"] = 16 * P / n
    if n > 1:
        out["ZeRO-3 gathered layers"] = 2 * arch.layer_params() * dtype_bytes
    out["activations"] = activation_bytes(
        arch, micro_batch * sequences_per_sample, seq_len, dtype_bytes, checkpointing, logits
    )
    return out


def engine_memory(arch: Arch, dtype_bytes: int, tp: int, budget: float) -> dict[str, float]:
    """Bytes per GPU of a vLLM engine given `budget` bytes: weights / tp, reserve, KV cache in the rest."""
    weights = arch.params() * dtype_bytes / tp
    return {
        "engine weights": weights,
        "engine reserve": ENGINE_RESERVE,
        "engine KV cache": budget - weights - ENGINE_RESERVE,
    }


@dataclass
class StagePlan:
    name: str
    phases: dict[str, dict[str, float]]  # phase -> component -> bytes on the busiest GPU
    notes: list[str]
    refusal: Optional[str] = None

    def peak(self) -> float:
        return max((sum(v.values()) for v in self.phases.values()), default=0.0)


def _lora(tc) -> tuple[int, tuple[str, ...]]:
    return (tc.lora.r, tuple(tc.lora.target_modules)) if tc.lora.enabled else (0, ())


def plan_stage(cfg, name: str, arch: Arch, dtype_bytes: int, gpu_bytes: float, gpus_per_node: int = 8) -> StagePlan:
    """The memory of stage `name` of the PipelineConfig `cfg` on its busiest GPU, phase by phase."""
    from align.stages import spec

    kind = spec(name).kind
    s = cfg.stage(name)
    ro = cfg.rollout
    phases: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    P = arch.params()
    rms = {"reward models (2, whole)": 2 * P * dtype_bytes}

    def train(tc, seq_len, sequences_per_sample=1, logits=True, lora=None):
        r, targets = lora if lora is not None else _lora(tc)
        return training_memory(
            arch,
            processes=tc.num_processes,
            micro_batch=tc.micro_batch_size,
            seq_len=seq_len,
            dtype_bytes=dtype_bytes,
            checkpointing=tc.gradient_checkpointing,
            lora_r=r,
            lora_targets=targets,
            sequences_per_sample=sequences_per_sample,
            logits=logits,
        )

    def static(parts: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in parts.items() if k != "activations"}

    engine = None
    if kind in ("rejection", "ppo", "gatt", "eval", "label") and ro.engine == "vllm":
        budget = ro.gpu_memory_utilization * gpu_bytes
        engine = engine_memory(arch, dtype_bytes, ro.tensor_parallel_size, budget)
        kv_tokens = engine["engine KV cache"] / arch.kv_bytes_per_token(dtype_bytes, ro.tensor_parallel_size)
        notes.append(f"engine: tp {ro.tensor_parallel_size}, KV cache for ~{max(0, int(kv_tokens)):,} tokens")
        if arch.heads % ro.tensor_parallel_size:
            return StagePlan(name, phases, notes, _refuse_tp(arch, ro))
        if ro.tensor_parallel_size > gpus_per_node and ro.executor != "ray":
            return StagePlan(
                name,
                phases,
                notes,
                f"rollout.tensor_parallel_size={ro.tensor_parallel_size} spans more than one node's "
                f"{gpus_per_node} GPUs: set rollout.executor=ray (docs/gpu.md) or a smaller tensor_parallel_size",
            )
        if kv_tokens < ro.max_model_len:
            return StagePlan(
                name,
                {"generate": engine},
                notes,
                f"the engine's share ({ro.gpu_memory_utilization:.2f} x {gpu_bytes / GiB:.0f} GiB) leaves KV cache "
                f"for {max(0, int(kv_tokens))} tokens, under one sequence of rollout.max_model_len={ro.max_model_len}: "
                "raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size",
            )

    if kind == "sft":
        phases["train"] = train(s.train, s.max_length)
    elif kind == "reward":
        # a pair is two sequences (chosen, rejected); a scalar head, no logits over the vocabulary
        phases["train"] = train(s.train, s.max_length, sequences_per_sample=2, logits=False)
    elif kind in ("rejection", "gatt"):
        t = train(s.train, s.max_length)
        scorers = rms if kind == "rejection" else {}
        phases["generate"] = {**scorers, **engine} if engine else dict(scorers)
        phases["train"] = t
    elif kind == "ppo":
        every = replica_spacing(ro, s.num_processes)  # (a loaded config has passed it)
        if ro.replicas > 1:
            hosts = ", ".join(str(r) for r in range(0, s.num_processes, every))
            notes.append(f"{ro.replicas} engine replicas, beside ranks {hosts}")
        # PPO's optimisation settings in TrainConfig's shape
        tc_like = SimpleNamespace(
            num_processes=s.num_processes,
            micro_batch_size=s.micro_batch_size,
            gradient_checkpointing=s.gradient_checkpointing,
        )
        t = train(tc_like, ro.max_model_len, lora=(s.lora.r, tuple(s.lora.target_modules)))
        if s.reward.shard:  # each RM partitioned over the ranks; a forward gathers one layer of it at a time
            rms = {
                f"reward models (2, sharded over {s.num_processes})": 2 * P * dtype_bytes / s.num_processes
                + 2 * arch.layer_params() * dtype_bytes
            }
        t = {**rms, **t}
        phases["train"] = t
        phases["generate"] = {**static(t), **engine} if engine else static(t)
    elif kind in ("eval", "label"):
        uses_rms = kind == "eval" or (s.judge == "auto" and s.auto.judge == "reward")
        phases["generate"] = {**(rms if uses_rms else {}), **(engine or {})}
    if engine and not ro.enable_sleep_mode and "train" in phases:
        # awake through training: its share stays taken on the GPUs it shares
        phases["train"] = {**phases["train"], "engine (awake, no sleep mode)": ro.gpu_memory_utilization * gpu_bytes}
    plan = StagePlan(name, phases, notes)
    plan.refusal = _refusal(plan, name, kind, s, ro, gpu_bytes)
    return plan


def _refuse_tp(arch: Arch, ro) -> str:
    ok = [t for t in (1, 2, 4, 8, 16) if arch.heads % t == 0]
    return (
        f"rollout.tensor_parallel_size={ro.tensor_parallel_size} does not divide the model's "
        f"{arch.heads} attention heads: use one of {ok}"
    )


def _refusal(plan: StagePlan, name: str, kind: str, s, ro, gpu_bytes: float) -> Optional[str]:
    """None if every phase fits in `gpu_bytes`; else what does not fit and the key to change."""
    over = [(p, parts) for p, parts in plan.phases.items() if sum(parts.values()) > gpu_bytes]
    if not over:
        return None
    phase, parts = max(over, key=lambda x: sum(x[1].values()))
    biggest = max(parts, key=parts.get)
    total = sum(parts.values()) / GiB
    head = f"stage '{name}' needs {total:.1f} GiB a GPU in its {phase} phase, over {gpu_bytes / GiB:.0f} GiB; largest: {biggest} {parts[biggest] / GiB:.1f} GiB"
    prefix = name if kind == "ppo" else f"{name}.train"
    if biggest.startswith("reward models"):
        fix = (
            f"set {name}.reward.shard=true (each reward model partitioned over the stage's ranks)"
            if kind == "ppo" and not s.reward.shard
            else "every scoring GPU loads both reward models whole (only PPO shards them): drop "
            f"'{name}' from stages, or train the reward models from a smaller model"
        )
    elif biggest == "activations":
        ckpt = (
            s.gradient_checkpointing
            if kind == "ppo"
            else getattr(getattr(s, "train", None), "gradient_checkpointing", True)
        )
        fix = (
            f"set {prefix}.gradient_checkpointing=true"
            if not ckpt
            else f"lower {prefix}.micro_batch_size or the stage's max_length"
            + (" (or rollout.max_model_len: PPO trains on prompt + response)" if kind == "ppo" else "")
        )
    elif biggest.startswith("engine"):
        fix = "set rollout.enable_sleep_mode=true, or lower rollout.gpu_memory_utilization"
    else:
        fix = f"raise {prefix}.num_processes (ZeRO-3 shards over more GPUs)" + (
            f" or set {name}.train.lora.enabled=true" if kind != "ppo" else ""
        )
    return f"{head}: {fix}"


def plan_config(cfg, gpu_mem_gib: float = 80.0, dtype: str = "auto", gpus_per_node: int = 8, arch: Arch = None):
    """(architecture source, [StagePlan] for every stage the config runs, first round's names)."""
    if arch is None:
        arch, source = model_arch(cfg.model)
    else:
        source = "given"
    precision = cfg.precision if dtype == "auto" else dtype
    dtype_bytes = 4 if precision == "fp32" else 2  # auto plans for GPUs: bf16 (docs/precision.md)
    names = list(dict.fromkeys(list(cfg.stages) + list(cfg.round_stages if cfg.rounds > 1 else ())))
    plans = [plan_stage(cfg, n, arch, dtype_bytes, gpu_mem_gib * GiB, gpus_per_node) for n in names]
    return arch, source, dtype_bytes, plans


def format_plan(arch: Arch, source: str, dtype_bytes: int, plans: list[StagePlan], gpu_mem_gib: float) -> str:
    lines = [
        f"model: {arch.params() / 1e9:.2f}B parameters, {arch.layers} layers, hidden {arch.hidden}, "
        f"heads {arch.heads}/{arch.kv_heads} kv, vocab {arch.vocab} ({source}); "
        f"{'bf16' if dtype_bytes == 2 else 'fp32'}; {gpu_mem_gib:.0f} GiB a GPU",
        "",
        f"{'stage':<20} {'phase':<9} {'GiB/GPU':>8}  components (GiB)",
    ]
    for p in plans:
        for phase, parts in p.phases.items():
            comp = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items())
            lines.append(f"{p.name:<20} {phase:<9} {sum(parts.values()) / GiB:>8.1f}  {comp}")
        for n in p.notes:
            lines.append(f"{'':<20} {'':<9} {'':>8}  {n}")
        lines.append(f"{'':<20} {'':<9} {'':>8}  {'FITS' if p.refusal is None else 'DOES NOT FIT: ' + p.refusal}")
    return "\n".join(lines)


def main(config: str, overrides: list[str], gpu_mem_gib: float, dtype: str, gpus_per_node: int) -> int:
    from align.config import load_config

    cfg = load_config(config, overrides)
    arch, source, dtype_bytes, plans = plan_config(cfg, gpu_mem_gib, dtype, gpus_per_node)
    print(format_plan(arch, source, dtype_bytes, plans, gpu_mem_gib))
    refused = [p for p in plans if p.refusal]
    if refused:
        raise ConfigError("; ".join(p.refusal for p in refused))
    return 0
