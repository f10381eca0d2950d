"""Reward-model training: data -> setup -> train -> evaluate -> save, Llama 2 (Touvron et al., 2023) sec. 3.2.2.

Why our own loop and not TRL's `RewardTrainer` (trl 1.16, read and measured):
- it reports one accuracy, while the recipe judges an RM per rating level (Table 28) and the safety
  RM by unsafe-response recall (Table 29), and it has no hook for the safety auxiliary loss;
- it silently DROPS pairs longer than max_length (its `dataset.filter`): of the 1,845 parseable
  shared HH pairs with SmolLM2's template, 69 at 512 tokens and 519 at 256; we truncate the prompt
  from the left and count the truncations;
- it batches pairs in random order. (Like this loop, it does forward chosen and rejected as ONE
  batch padded once: its `DataCollatorForPreference` concatenates them.) Here micro-batches are
  grouped by length: on those HH pairs, batches of 8 pairs, the pad share of the forwards falls from
  53% to 18% at 512 tokens (808 -> 466 padded tokens per pair) and from 35% to 12% at 256.
  `rm/pad_share` logs it per step.
The wall-clock comparison with TRL is bench/reward.py (bench/README.md).

Levers for speed on a CPU with bf16 matrix units: the run's precision (align/precision.py; full
fine-tuning in bf16: bf16 weights with fp32 masters and the fused AdamW, align/launch/local.py; LoRA:
autocast over bf16 frozen base weights, `base_dtype`); each pair as ONE row [prompt, chosen,
rejected] with a 4-D mask (`shared_prefix`, reward/model.py: the prompt is forwarded once, 250
instead of 2 x 196 tokens per HH pair); micro-batches grouped by row length.

Processes: with `train.num_processes` N > 1 the stage runs on N ranks under `accelerate launch` (the
pipeline starts them: `align rm train CONFIG rm_helpful.train.num_processes=2`), the model sharded by
DeepSpeed ZeRO-3 (gloo on CPU, NCCL on GPUs; align/launch/zero3.py). Every rank draws the same stream
of micro-batches; an optimizer step's `batch_size / micro_batch_size` micro-batches are dealt out in
turn, so each rank forwards `grad_accum` of them: a disjoint share of the step's pairs. The losses are
divided by the pair count of the WHOLE step, so the gradient summed over micro-batches and ranks, and
the step, are those of one process on the same pairs (tests/reward/test_train.py). Metrics are
gathered: rank 0 logs the step's global loss and accuracies. A non-finite loss stops every rank at
once (its check is all-reduced before the backward). Rank 0 alone writes the model (gathered to full
weights: it loads with `from_pretrained` like the one-process model), the evaluation and the summary.
Under ZeRO-3, bf16 precision is DeepSpeed's bf16 mode (bf16 weights, fp32 master copies) as in PPO and
SFT; one process does the same for full fine-tuning.

Resumable: every `train.save_steps` optimizer steps, `out_dir/checkpoints/step-N/` is written
atomically with the trainable weights (under ZeRO-3: DeepSpeed's partitioned checkpoint, every rank
writing its part), optimizer, scheduler, RNG state and data position; a restart continues from the
newest checkpoint and reproduces the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from align import checkpoint
from align.configlib import to_dict
from align.errors import AlignError
from align.faults import fault
from align.schedule import lr_scheduler, warmup_steps
from align.io import atomic_dir, read_json, write_json_atomic
from align.launch import dist
from align.launch.local import AdamW, LocalLearner
from align.models import compile_layers, freeze_lower_layers
from reward.losses import RATING_LEVELS, accuracy_by_level, margin_table, ranking_loss, safety_aux_loss
from reward.model import (
    RewardScorer,
    format_pair,
    load_reward_model,
    pad_batch,
    save_reward_model,
    sequence_scores,
    shared_prefix_batch,
    shared_prefix_length,
    shared_prefix_scores,
    supports_shared_prefix,
)

if TYPE_CHECKING:
    from align.config import RewardConfig, TrainConfig

GROUP_STEPS = 8  # length grouping sorts pairs within windows of this many optimizer steps' worth
ADAM_BETAS = (0.9, 0.95)  # Llama 2 sec. 2.2 (the optimizer of the base model); sec. 3.2.2 keeps it
ADAM_EPS = 1e-5
MODEL_SUBDIR = "model"
CHECKPOINTS_SUBDIR = "checkpoints"
CHECKPOINT_PREFIX = "step"


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class EncodedPair:
    """One preference pair, tokenised; margin already resolved."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    rating_idx: int  # index into RATING_LEVELS
    margin: float  # m(r) used in the ranking loss
    chosen_safe: Optional[bool]
    rejected_safe: Optional[bool]
    source: str
    truncated: bool  # either response was truncated to max_length

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """Tokens of its `shared_prefix_batch` row: the common prefix once, then both answers."""
        return len(self.chosen_ids) + len(self.rejected_ids) - shared_prefix_length(self.chosen_ids, self.rejected_ids)


def rating_index(rating: str) -> int:
    if rating not in RATING_LEVELS:
        raise AlignError(f"rating {rating!r}: must be one of {', '.join(RATING_LEVELS)}")
    return RATING_LEVELS.index(rating)


def pair_margin(record: dict, table: tuple[float, ...], margin_mode: str) -> float:
    """m(r) of a record: 0 with ``margin: none``; else the record's explicit margin, else the table's."""
    if margin_mode == "none":
        return 0.0
    if record["margin"] is not None:
        return float(record["margin"])
    return table[rating_index(record["rating"])]


def encode_pairs(tokenizer, records: Sequence[dict], cfg: "RewardConfig") -> list[EncodedPair]:
    """Tokenise preference records (schema: align/data/schema.py) for a `RewardConfig`."""
    table = margin_table(cfg.margin_table if cfg.margin == "custom" else cfg.margin)
    out = []
    for rec in records:
        c = format_pair(tokenizer, rec["prompt"], rec["chosen"], cfg.max_length)
        r = format_pair(tokenizer, rec["prompt"], rec["rejected"], cfg.max_length)
        out.append(
            EncodedPair(
                c.input_ids,
                r.input_ids,
                rating_index(rec["rating"]),
                pair_margin(rec, table, cfg.margin),
                rec["chosen_safe"],
                rec["rejected_safe"],
                rec["source"],
                c.truncated or r.truncated,
            )
        )
    return out


def epoch_micro_batches(lengths: Sequence[int], micro: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped micro-batches of one epoch (a deterministic function of seed and epoch).

    Pairs are shuffled, cut into windows of ``batch * GROUP_STEPS`` pairs, sorted by length within a
    window and cut into micro-batches of ``micro``, whose order is then shuffled. A micro-batch thus
    holds pairs of similar length (little padding), while steps still mix lengths and windows.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch * GROUP_STEPS
    chunks = []
    for w in range(0, len(perm), window):
        part = sorted(perm[w : w + window], key=lambda i: lengths[i], reverse=True)
        chunks.extend(part[k : k + micro] for k in range(0, len(part), micro))
    order = torch.randperm(len(chunks), generator=g).tolist()
    return [chunks[i] for i in order]


def micro_batch_stream(lengths: Sequence[int], micro: int, batch: int, seed: int, skip: int) -> Iterator[list[int]]:
    """Endless stream of micro-batches over successive epochs, starting after ``skip`` of them."""
    per_epoch = math.ceil(len(lengths) / micro)
    epoch, offset = divmod(skip, per_epoch)
    while True:
        for mb in epoch_micro_batches(lengths, micro, batch, seed, epoch)[offset:]:
            yield mb
        epoch, offset = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------
# Optimisation


def micro_batches_per_step(train_cfg: "TrainConfig") -> int:
    """Micro-batches of one optimizer step over all processes: batch_size / micro_batch_size."""
    return train_cfg.grad_accum * train_cfg.num_processes


def total_steps(n_pairs: int, train_cfg: "TrainConfig") -> int:
    """Optimizer steps of a run: ``max_steps``, or enough micro-batches for ``epochs`` passes."""
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps
    per_epoch = math.ceil(n_pairs / train_cfg.micro_batch_size)
    return max(1, math.ceil(train_cfg.epochs * per_epoch / micro_batches_per_step(train_cfg)))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def load_trainable(model, weights: dict[str, torch.Tensor], where: Path, hint: str = "") -> None:
    """Copy trainable tensors saved by name (`LocalLearner.trainable_state`) into ``model``."""
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise AlignError(f"{where}: weights {missing[:3]} do not match the model{hint}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def save_checkpoint(ckpt_root: Path, step: int, learner, scheduler, state: dict, keep: int) -> Path:
    """Checkpoint ``ckpt_root/step-N`` (align/checkpoint.py), keeping the newest ``keep``; every rank
    calls it and writes its part (its optimizer partition under ZeRO-3)."""

    def write(tmp: Path) -> None:
        if isinstance(learner, LocalLearner):
            learner.save(tmp)
        else:  # DeepSpeed's checkpoint is the resume state; the final model is gathered at the end
            learner.save(tmp, gathered=False)
        if learner.rank == 0:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")

    return checkpoint.save_checkpoint(
        ckpt_root, f"{CHECKPOINT_PREFIX}-{step}", state, write, rank=learner.rank, keep=keep
    )


def load_checkpoint(path: Path, learner, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the loop state."""
    learner.load(path)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the step's lr, whether or not the optimizer's own state carried it
    return checkpoint.load_checkpoint(path, learner.rank)


def run_fingerprint(cfg: "RewardConfig", seed: int, pairs: Sequence[EncodedPair]) -> str:
    """What a checkpoint must share with the run that resumes it: config, seed and data."""
    h = hashlib.sha256(json.dumps({"cfg": to_dict(cfg), "seed": seed}, sort_keys=True, default=str).encode())
    for p in pairs:
        h.update(repr((p.chosen_ids, p.rejected_ids, p.rating_idx, p.margin)).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The loop


def _safety_labels(pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) is_safe and label_mask (True = labelled), chosen first then rejected."""
    labels = [p.chosen_safe for p in pairs] + [p.rejected_safe for p in pairs]
    return (torch.tensor([bool(x) for x in labels]), torch.tensor([x is not None for x in labels]))


def token_pieces(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Cut one micro-batch into pieces whose padded size (rows x longest row) is at most `budget`.

    Args:
        lengths: the row length of each pair (its `shared_length`, or its longer answer with two rows).
        budget: tokens per piece; 0 = no cut.

    Returns:
        Index lists covering every pair once, longest first; a row longer than `budget` is a piece of
        its own. One 1,024-token pair row among seven of ~300 pads the micro-batch to 8 x 1,024 tokens;
        cut at 2,048 it runs as pieces of 2 x 1,024 and 6 x ~330.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if budget <= 0:
        return [order] if order else []
    pieces: list[list[int]] = []
    for i in order:  # longest first: a piece's first row is its longest
        if pieces and (len(pieces[-1]) + 1) * lengths[pieces[-1][0]] <= budget:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


def uses_shared_prefix(cfg: "RewardConfig", model) -> bool:
    """`cfg.shared_prefix`, unless the model's attention cannot take a custom 4-D mask (flash attention)."""
    return cfg.shared_prefix and supports_shared_prefix(model)


def train_step(
    learner,
    micro: Sequence[Sequence[EncodedPair]],
    cfg: "RewardConfig",
    step: int,
    pad_id: int,
    shared: bool,
    bf16: bool = False,
) -> dict:
    """Forward/backward of this rank's share of one optimizer step, then the (clipped) step.

    Args:
        learner: `LocalLearner` or `align.launch.zero3.DeepSpeedLearner`.
        micro: ALL micro-batches of the step, the same on every rank; rank r forwards ``micro[r::N]``
            (N processes), each cut by `token_pieces` with ``cfg.micro_batch_tokens``.
        shared: one `shared_prefix_batch` row per pair (`uses_shared_prefix`), else chosen and rejected
            as rows of their own.
        bf16: forward under bf16 autocast (the run's precision, align/precision.py).

    The losses are normalised by the pairs (and safety labels) of the WHOLE step, so accumulation
    over micro-batches and ranks gives the gradient of the full batch. Raises AlignError naming
    ``step`` (1-based) on a non-finite loss (before its backward) or gradient norm, on every rank at once;
    with ``train.nonfinite: skip`` (one process) the step is not taken and ``{"rm/skipped": 1.0}`` returned.

    Returns:
        The step's metrics over all its pairs, on every rank: ``rm/loss``, the ranking metrics,
        ``rm/grad_norm`` and ``rm/pad_share``.
    """
    tc = cfg.train
    use_aux = cfg.safety_aux_weight > 0
    n_pairs = sum(len(mb) for mb in micro)
    n_labels = sum(int(_safety_labels(mb)[1].sum()) for mb in micro) if use_aux else 0
    mine = micro[learner.rank :: learner.world_size]
    if cfg.micro_batch_tokens:  # one process (config check): every rank must run the same forwards
        row = (lambda p: p.shared_length) if shared else (lambda p: p.length)
        mine = [
            [mb[i] for i in piece]
            for mb in mine
            for piece in token_pieces([row(p) for p in mb], cfg.micro_batch_tokens // (1 if shared else 2))
        ]
    loss_total, aux_total, real_tokens, all_tokens = 0.0, 0.0, 0, 0
    r_c_all, r_r_all, m_all, lvl_all = [], [], [], []
    grad_norm = None
    for j, batch in enumerate(mine):
        b = len(batch)
        with torch.autocast(learner.device.type, dtype=torch.bfloat16, enabled=bf16):
            if shared:  # one row per pair: [prompt, chosen, rejected], the prompt forwarded once
                packed = shared_prefix_batch([(p.chosen_ids, p.rejected_ids) for p in batch], pad_id)
                real_tokens, all_tokens = real_tokens + packed.real_tokens, all_tokens + packed.input_ids.numel()
                r_c, r_r = (s.cpu() for s in shared_prefix_scores(learner.module, packed.to(learner.device)))
                scores = torch.cat([r_c, r_r])  # (2B,) chosen first
            else:  # chosen and rejected in ONE forward: (2B, T), chosen rows first
                ids, mask = pad_batch([p.chosen_ids for p in batch] + [p.rejected_ids for p in batch], pad_id)
                real_tokens, all_tokens = real_tokens + int(mask.sum()), all_tokens + mask.numel()
                scores = sequence_scores(learner.module, ids.to(learner.device), mask.to(learner.device)).cpu()
                r_c, r_r = scores[:b], scores[b:]
        margin = torch.tensor([p.margin for p in batch], dtype=torch.float32)
        loss, _ = ranking_loss(r_c, r_r, margin, denom=n_pairs)
        if n_labels:
            is_safe, labelled = _safety_labels(batch)
            aux, _ = safety_aux_loss(scores, is_safe, labelled, denom=n_labels)
            aux_total += aux.item()
            loss = loss + cfg.safety_aux_weight * aux
        # every rank learns whether ANY rank's loss is non-finite, so all raise together
        checked = dist.all_reduce_sum(loss.detach().float())
        if not torch.isfinite(checked) and tc.nonfinite == "skip":  # one process (config check)
            learner.discard()
            return {"rm/skipped": 1.0}
        if not torch.isfinite(checked):
            raise AlignError(
                f"reward model: non-finite loss ({checked.item()}) at step {step}; lower "
                f"train.lr (now {tc.lr}) or check the data"
            )
        grad_norm = learner.accumulate(loss, boundary=(j == len(mine) - 1))
        loss_total += loss.item()
        r_c_all.append(r_c.detach())
        r_r_all.append(r_r.detach())
        m_all.append(margin)
        lvl_all.append(torch.tensor([p.rating_idx for p in batch]))
    if (grad_norm is None or not math.isfinite(grad_norm)) and tc.nonfinite == "skip":
        return {"rm/skipped": 1.0}  # the learner stepped nothing and dropped the gradients
    if grad_norm is None or not math.isfinite(grad_norm):  # the global norm: the same on every rank
        raise AlignError(f"reward model: non-finite gradient norm at step {step}; lower train.lr (now {tc.lr})")
    # the whole step's numbers on every rank (rank order; the metrics do not depend on it)
    parts = dist.all_gather_object(
        (
            torch.cat(r_c_all),
            torch.cat(r_r_all),
            torch.cat(m_all),
            torch.cat(lvl_all),
            loss_total,
            aux_total,
            real_tokens,
            all_tokens,
        )
    )
    r_c, r_r, margins, levels = (torch.cat([p[i] for p in parts]) for i in range(4))
    _, rank_metrics = ranking_loss(r_c, r_r, margins)
    by_level = accuracy_by_level(r_c, r_r, levels)
    real_tokens, all_tokens = sum(p[6] for p in parts), sum(p[7] for p in parts)
    metrics = {
        "rm/loss": sum(p[4] for p in parts),
        **rank_metrics,
        **{k: v for k, v in by_level.items() if not k.startswith("rm/count/")},
        "rm/grad_norm": grad_norm,
        "rm/pad_share": 1.0 - real_tokens / max(all_tokens, 1),
    }
    if use_aux:
        metrics["rm/safety_aux_loss"] = sum(p[5] for p in parts)
    return metrics


def base_dtype(tc: "TrainConfig", bf16: bool) -> str:
    """The dtype the RM's weights load in: LoRA keeps its frozen base in the run's precision; full
    fine-tuning loads float32 (bf16 copies are made by the learner, over fp32 masters)."""
    return "bfloat16" if bf16 and tc.lora is not None and tc.lora.enabled else "float32"


def build_learner(
    model_dir, tokenizer, tc: "TrainConfig", seed: int, bf16: bool, ds_config: Optional[dict], freeze_layers: int = 0
):
    """(learner, optimizer, hf_ds_config): the model, its AdamW and, on N > 1 processes, the ZeRO-3 engine.

    Under ZeRO-3 the model loads while an `HfDeepSpeedConfig` is alive, so `from_pretrained` partitions
    it; keep the returned config alive while training. The new score head is initialised from
    ``seed`` identically on any number of processes.
    """
    world = tc.num_processes
    hf_ds = ds = None
    if world > 1:
        from transformers.integrations import HfDeepSpeedConfig

        from align.launch import init_distributed
        from align.launch.zero3 import resolve_config

        if ds_config is None:
            raise AlignError(
                f"rm train.num_processes={world}: run the stage through `align rm train`, `align stage` "
                "or `align run`, which launch the processes"
            )
        init_distributed()  # before the model is built: ZeRO-3 partitions it over the ranks
        if dist.world_size() != world:
            raise AlignError(
                f"rm train.num_processes={world}, but this process is one of {dist.world_size()}; "
                "run it through `align rm train`, `align stage` or `align run`"
            )
        ds = resolve_config(ds_config, tc.micro_batch_size, tc.grad_accum, world, tc.max_grad_norm, bf16)
        hf_ds = HfDeepSpeedConfig(ds)
    torch.manual_seed(seed)  # the new score head's initialisation
    model = load_reward_model(model_dir, tokenizer, lora=tc.lora, base_dtype=base_dtype(tc, bf16))
    freeze_lower_layers(model, freeze_layers)
    model.train()
    adamw = AdamW(tc.lr, ADAM_BETAS, ADAM_EPS, tc.weight_decay)
    if world == 1:
        # full fine-tuning in bf16: bf16 weights, fp32 masters (DeepSpeed's bf16 mode; align/launch/local.py)
        full = not (tc.lora is not None and tc.lora.enabled)
        learner = LocalLearner(
            model, adamw, tc.max_grad_norm, "cuda" if torch.cuda.is_available() else "cpu", bf16_weights=bf16 and full
        )
        compile_layers(model, tc.compile)
        return learner, learner.optimizer, None
    from align.launch.zero3 import DeepSpeedLearner

    optimizer = adamw.build(p for p in model.parameters() if p.requires_grad)
    return DeepSpeedLearner(model, optimizer, ds), optimizer, hf_ds


def gathered_model(model_dir, tokenizer, tc: "TrainConfig", seed: int, bf16: bool, trainable: dict[str, torch.Tensor]):
    """Rank 0 after ZeRO-3 training: an unsharded model with the gathered trainable weights."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # this model is loaded whole, on rank 0 alone
    torch.manual_seed(seed)  # LoRA: the frozen copy of the head, as in one process
    model = load_reward_model(model_dir, tokenizer, lora=tc.lora, base_dtype=base_dtype(tc, bf16))
    load_trainable(model, trainable, Path(model_dir))
    return model


# ---------------------------------------------------------------------------------------------------
# Phases of a run: build data -> set up the learner (resume) -> train -> evaluate -> write artifacts


@dataclass(frozen=True)
class TrainData:
    """The encoded training pairs and what a run derives from them."""

    pairs: list[EncodedPair]
    steps: int  # optimizer steps of the run (`total_steps`)
    warmup: int  # of them, warm-up steps (align/schedule.py)
    fingerprint: str  # what a checkpoint must share with the run that resumes it (`run_fingerprint`)

    @property
    def truncated(self) -> int:
        return sum(p.truncated for p in self.pairs)


@dataclass(frozen=True)
class Position:
    """Where the loop stands; checkpointed (state.json, beside the run's fingerprint)."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    micro_batches: int = 0  # micro-batches drawn from `micro_batch_stream`
    pairs_seen: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (`train.nonfinite: skip`)


@dataclass
class Run:
    """What the loop needs, built by `setup_learner`: the model being trained and what steps it."""

    learner: object  # `LocalLearner` or `align.launch.zero3.DeepSpeedLearner`
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: Position  # where the loop begins: 0, or the resumed checkpoint's position
    shared: bool  # one `shared_prefix_batch` row per pair (`uses_shared_prefix`)
    hf_ds_config: Optional[object] = None  # keeps ZeRO-3 model loading on while alive

    @property
    def main(self) -> bool:
        return self.learner.rank == 0


@dataclass(frozen=True)
class TrainResult:
    """What the loop hands to the summary."""

    end: Position
    seconds: float  # wall-clock of the loop
    pairs_per_s: float  # pairs trained by this run (not the resumed part) per second
    metrics: dict  # the last step's metrics ({} when there was no step left to take)


def build_data(tokenizer, train_records: Sequence[dict], cfg: "RewardConfig", seed: int) -> TrainData:
    """Tokenise the training records; check that there are pairs, and safety labels where the auxiliary
    loss needs them."""
    pairs = encode_pairs(tokenizer, train_records, cfg)
    if not pairs:
        raise AlignError("reward model: no training pairs")
    if cfg.safety_aux_weight > 0 and not any(p.chosen_safe is not None or p.rejected_safe is not None for p in pairs):
        raise AlignError(
            f"safety_aux_weight={cfg.safety_aux_weight} but no training pair has a safety label "
            "(chosen_safe / rejected_safe); set safety_aux_weight=0 or add labelled safety data"
        )
    steps = total_steps(len(pairs), cfg.train)
    return TrainData(pairs, steps, warmup_steps(steps, cfg.train.warmup_ratio), run_fingerprint(cfg, seed, pairs))


def setup_learner(
    model_dir: str | Path,
    tokenizer,
    cfg: "RewardConfig",
    data: TrainData,
    ckpt_root: Path,
    seed: int,
    bf16: bool,
    ds_config: Optional[dict],
) -> Run:
    """The model, its optimizer and lr schedule; restored from the newest checkpoint under `ckpt_root`
    when there is one (it must be of this config, seed and data)."""
    tc = cfg.train
    learner, optimizer, hf_ds = build_learner(model_dir, tokenizer, tc, seed, bf16, ds_config, cfg.freeze_layers)
    scheduler = lr_scheduler(optimizer, data.warmup, data.steps, tc.min_lr_ratio)
    start = Position()
    existing = checkpoint.latest_checkpoint(ckpt_root, CHECKPOINT_PREFIX)
    if existing:
        if read_json(existing / checkpoint.STATE)["fingerprint"] != data.fingerprint:
            raise AlignError(
                f"{existing}: checkpoint of a different config, seed or data; delete {ckpt_root} to start over"
            )
        state = load_checkpoint(existing, learner, scheduler)
        start = Position(state["step"], state["micro_batches"], state["pairs_seen"], state.get("skipped_steps", 0))
    shared = uses_shared_prefix(cfg, learner.module)
    if cfg.shared_prefix and not shared and learner.rank == 0:
        print(
            "[align] reward model: the model's attention takes no custom 4-D mask; chosen and rejected are "
            "forwarded as separate rows (shared_prefix off)",
            flush=True,
        )
    return Run(learner, scheduler, start, shared, hf_ds)


def train_loop(
    run: Run, data: TrainData, cfg: "RewardConfig", pad_id: int, seed: int, ckpt_root: Path, logger, bf16: bool
) -> TrainResult:
    """Optimizer steps from `run.start` to `data.steps`: `train_step` on each step's micro-batches, the
    schedule stepped after every step (a skipped one too), metrics logged every `train.logging_steps`
    and at the end, a checkpoint every `train.save_steps` (not at the end: the model is written then)."""
    tc = cfg.train
    pos = run.start
    lengths = [p.shared_length if run.shared else p.length for p in data.pairs]
    stream = micro_batch_stream(lengths, tc.micro_batch_size, tc.batch_size, seed, pos.micro_batches)
    per_step = micro_batches_per_step(tc)
    t0, metrics = time.perf_counter(), {}
    last_metrics = {"rm/loss": float("nan"), "rm/accuracy": float("nan")}
    bar = tqdm(
        total=data.steps, initial=pos.step, desc="reward model", unit="step", dynamic_ncols=True, disable=not run.main
    )
    while pos.step < data.steps:
        micro = [[data.pairs[i] for i in next(stream)] for _ in range(per_step)]
        metrics = train_step(run.learner, micro, cfg, pos.step + 1, pad_id, run.shared, bf16)
        skipped = pos.skipped_steps
        if metrics.pop("rm/skipped", 0.0):
            skipped += 1
            print(
                f"[align] reward model: non-finite loss or gradient at step {pos.step + 1}, step skipped "
                f"({skipped} so far)",
                flush=True,
            )
            metrics = {**last_metrics}
        last_metrics = metrics
        metrics["rm/skipped_steps"] = float(skipped)
        fault("rm_step")
        lr_now = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        pos = Position(
            pos.step + 1, pos.micro_batches + len(micro), pos.pairs_seen + sum(len(mb) for mb in micro), skipped
        )
        metrics.update(
            {
                "rm/lr": lr_now,
                "rm/epoch": pos.micro_batches / math.ceil(len(data.pairs) / tc.micro_batch_size),
                "rm/pairs_per_s": (pos.pairs_seen - run.start.pairs_seen) / max(time.perf_counter() - t0, 1e-9),
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['rm/loss']:.3f}", acc=f"{metrics['rm/accuracy']:.2f}")
        if logger is not None and (pos.step % tc.logging_steps == 0 or pos.step == data.steps):
            logger.log(metrics, pos.step)
        if pos.step % tc.save_steps == 0 and pos.step < data.steps:
            state = {**asdict(pos), "fingerprint": data.fingerprint}
            save_checkpoint(ckpt_root, pos.step, run.learner, run.scheduler, state, tc.save_total_limit)
    bar.close()
    seconds = time.perf_counter() - t0
    return TrainResult(pos, seconds, (pos.pairs_seen - run.start.pairs_seen) / max(seconds, 1e-9), metrics)


def trained_model(run: Run, model_dir: str | Path, tokenizer, tc: "TrainConfig", seed: int, bf16: bool):
    """The trained model in float32, in eval mode, on rank 0 (None on the others). Every rank calls it:
    under ZeRO-3 the trainable weights are gathered from all of them. The learner must not train after."""
    learner = run.learner
    final = learner.trainable_state() if learner.world_size > 1 else None  # ZeRO-3: a collective
    if not run.main:
        return None
    model = (
        learner.full_precision_net()
        if learner.world_size == 1
        else gathered_model(model_dir, tokenizer, tc, seed, bf16, final)
    )
    return model.eval()


def evaluate_model(scorer: RewardScorer, eval_records: Sequence[dict], tc: "TrainConfig") -> dict:
    """reward/evaluate.py's results (``metrics``, ``by_category``, ...) of the trained model on the
    held-out pairs, scored as every consumer scores it (`scorer`)."""
    from reward.evaluate import evaluate

    return evaluate(scorer, eval_records, batch_size=2 * tc.micro_batch_size)


def run_summary(data: TrainData, run: Run, result: TrainResult, tc: "TrainConfig", out_dir: Path) -> dict:
    """train_summary.json without the evaluation: steps, pairs, truncations, timings, final train metrics."""
    return {
        "steps": data.steps,
        "warmup_steps": data.warmup,
        "train_pairs": len(data.pairs),
        "pairs_seen": result.end.pairs_seen,
        "skipped_steps": result.end.skipped_steps,
        "truncated_pairs": data.truncated,
        "train_seconds": result.seconds,
        "pairs_per_s": result.pairs_per_s,
        "params_trainable": sum(
            getattr(p, "ds_numel", p.numel()) for p in run.learner.module.parameters() if p.requires_grad
        ),
        "processes": tc.num_processes,
        "model_dir": str(out_dir / MODEL_SUBDIR),
        "final_train_metrics": result.metrics,
    }


def write_artifacts(
    out_dir: Path, model, tokenizer, scorer: RewardScorer, summary: dict, results: Optional[dict]
) -> dict:
    """`out_dir/model/` (with scorer.json: how every consumer scores), the evaluation (eval.json, eval.md,
    eval_gaps.png) when there is one, and train_summary.json; returns the summary with the evaluation."""
    from reward.evaluate import write_eval

    with atomic_dir(out_dir / MODEL_SUBDIR) as tmp:
        save_reward_model(model, tokenizer, tmp, scorer.settings())
    if results is not None:
        write_eval(results, out_dir)
        summary = {**summary, "eval": results["metrics"], "eval_by_category": results["by_category"]}
    write_json_atomic(out_dir / "train_summary.json", summary)
    return summary


def train_reward_model(
    model_dir: str | Path,
    tokenizer,
    train_records: Sequence[dict],
    eval_records: Sequence[dict],
    cfg: "RewardConfig",
    out_dir: str | Path,
    seed: int,
    logger=None,
    bf16: bool = False,
    ds_config: Optional[dict] = None,
) -> dict:
    """Train a reward model on preference pairs; resume from ``out_dir/checkpoints`` if present.

    With ``cfg.train.num_processes`` N > 1, every one of the N ranks (under `accelerate launch`)
    calls it with the same arguments (``logger`` on rank 0 only).

    Args:
        model_dir: backbone directory (chat/SFT causal LM, or a saved RM).
        tokenizer: its tokenizer (`align.models.load_tokenizer`).
        train_records, eval_records: preference records (align/data/schema.py).
        cfg: `align.config.RewardConfig`.
        out_dir: stage directory: ``checkpoints/``, the final model in ``model/`` (reloads with
            ``from_pretrained``; LoRA adds ``model/adapter/``), ``eval.json`` / ``eval.md`` /
            ``eval_gaps.png`` and ``train_summary.json``.
        seed: seeds the head's initialisation and the data order.
        logger: anything with ``log(metrics: dict, step: int)`` (`align.io.MetricsLogger`), or None.
        bf16: train in bf16 (the run's precision, align/precision.py): full fine-tuning holds bf16 weights
            with fp32 masters, LoRA a bf16 frozen base under autocast; the adapters and head stay fp32.
        ds_config: N > 1: the launch's ZeRO-3 JSON (align/launch, ``work_dir/launch/ds_zero3.json``).

    Returns:
        Summary (rank 0; {} on the other ranks): steps, pairs seen, truncations, timings, final train
        metrics and eval metrics.
    """
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS_SUBDIR
    data = build_data(tokenizer, train_records, cfg, seed)
    run = setup_learner(model_dir, tokenizer, cfg, data, ckpt_root, seed, bf16, ds_config)
    result = train_loop(run, data, cfg, tokenizer.pad_token_id, seed, ckpt_root, logger, bf16)
    model = trained_model(run, model_dir, tokenizer, cfg.train, seed, bf16)  # rank 0; the others gather
    summary: dict = {}
    if model is not None:
        scorer = RewardScorer(model, tokenizer, max_length=cfg.max_length, bf16=bf16)
        results = evaluate_model(scorer, eval_records, cfg.train) if eval_records else None
        summary = write_artifacts(
            out_dir, model, tokenizer, scorer, run_summary(data, run, result, cfg.train, out_dir), results
        )
        if results is not None and logger is not None:  # under eval/: the train loop logs rm/accuracy too
            logger.log({f"eval/{k}": v for k, v in results["metrics"].items()}, result.end.step)
    dist.barrier()  # the other ranks wait for rank 0's evaluation and save
    return summary
