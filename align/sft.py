"""SFT stage (Llama 2 sec. 3.1): answer-only loss on multi-turn chats, packing, LoRA or full weights.

setup (tokenizer, data, model) -> train (TRL's SFTTrainer, resumable) -> save (a merged HF checkpoint
in `model/`, plus `adapter/` for LoRA). The loss mask comes from `align.chat.tokenize_chat`, passed to
TRL as `assistant_masks` on pre-tokenised rows: TRL's own `assistant_only_loss` needs `{% generation %}`
markers that SmolLM2's template lacks. Packing is TRL's best-fit-decreasing packing without padding;
attention stays within each conversation through `position_ids` (transformers derives the block mask).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

from align.checkpoint import latest_checkpoint
from align.errors import AlignError
from align.faults import fault
from align.schedule import lr_scheduler, warmup_steps

if TYPE_CHECKING:
    from align.pipeline import StageContext

TRAINER_STATE = "trainer_state.json"  # HF Trainer writes it last into a checkpoint


def tokenize_conversations(tokenizer, records: list[dict], max_length: int):
    """Conversation records -> `datasets.Dataset` with `input_ids` and `assistant_masks` (1 = trained)."""
    from datasets import Dataset

    from align.chat import tokenize_chat

    rows, dropped, truncated = [], 0, 0
    for rec in records:
        t = tokenize_chat(tokenizer, rec["messages"], max_length)
        if t is None:
            dropped += 1
            continue
        truncated += t.truncated
        rows.append({"input_ids": t.input_ids, "assistant_masks": [int(m) for m in t.loss_mask]})
    if not rows:
        raise AlignError(
            f"no conversation has an answer that fits in max_length={max_length} tokens: "
            "raise max_length or check the data"
        )
    stats = {
        "data/conversations": len(records),
        "data/dropped_too_long": dropped,
        "data/truncated": truncated,
        "data/tokens": sum(len(r["input_ids"]) for r in rows),
        "data/answer_tokens": sum(sum(r["assistant_masks"]) for r in rows),
    }
    return Dataset.from_list(rows), stats


def split_heldout(records: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: ``n`` whole conversations drawn by ``seed`` are held out, the rest trained on."""
    import random

    if n <= 0:
        return records, []
    if n >= len(records):
        raise AlignError(
            f"sft.test_size={n} holds out every one of the {len(records)} conversations: lower test_size or add data"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    test = set(order[:n])
    return [r for i, r in enumerate(records) if i not in test], [records[i] for i in sorted(test)]


def split_records(records: list[dict], n: int, seed: int, dedup: bool = True) -> tuple[list[dict], list[dict], dict]:
    """``(train, test, stats)``: `split_heldout`; with ``dedup``, of the records without exact duplicates (the
    first kept), and then without the held-out ones whose prompt (turns before the first answer) is trained on."""
    from align.data.dedup import drop_duplicates, drop_overlap

    dups = overlap = 0
    if dedup:
        records, dups = drop_duplicates(records)
    train, test = split_heldout(records, n, seed)
    if dedup:
        test, overlap = drop_overlap(test, train)
    return train, test, {"data/duplicates_dropped": dups, "data/heldout_overlap_dropped": overlap}


def answer_losses(model_dir: Path, dtype: str, rows) -> list[float]:
    """Each tokenised conversation's mean next-token loss over its trained (answer) tokens, in fp32.

    Only the trained positions go through the LM head, so a 49k-token vocabulary costs little."""
    import torch

    from align.models import load_causal_lm

    model = load_causal_lm(model_dir, dtype).eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            targets = torch.tensor(row["assistant_masks"][1:], dtype=torch.bool)
            hidden = model.model(input_ids=ids).last_hidden_state[0, :-1][targets]
            logits = model.lm_head(hidden).float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:][targets])
            losses.append(float(nll))
    return losses


def _finished(checkpoint: str) -> bool:
    """True when a Trainer checkpoint holds the run's last step."""
    import json

    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", -1)


def trained_token_loss(logits, labels, num_items=None):
    """Next-token loss, entropy and top-1 hits of the positions whose next token is trained.

    Args:
        logits: (B, k, V) at the positions kept (any float dtype; the log-softmax runs in fp32).
        labels: (B, k) the next token at those positions, -100 where it is not trained.
        num_items: the divisor of the summed loss (the trained tokens of the whole step under gradient
            accumulation, as transformers passes it); None = the trained tokens here.

    Returns: (loss, entropy_sum, n_correct, n_trained).
    """
    import torch

    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    loss = -(token_logp * mask).sum() / torch.as_tensor(n if num_items is None else num_items).clamp(min=1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        hits = (logp.argmax(-1) == labels) & mask
    return loss, (entropy * mask).sum(), hits.sum(), n


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer, with the loss computed on the trained positions only where TRL's fused LM head has
    no Triton kernel (the CPU).

    TRL replaces the LM head with a chunked log-prob function. Without Triton it scores EVERY position,
    in fp32 tiles (trl/trainer/utils.py `add_fused_lm_head`: compacting to the trained positions is left
    to Triton devices). Measured (py-spy, GAtt step of 4 x 512 packed tokens, SmolLM2-135M LoRA, bf16):
    40% of the step. Here the model's own forward projects only the positions whose next token is
    trained (`logits_to_keep`), in the autocast dtype, and `trained_token_loss` takes the fp32
    log-softmax. The same loss, entropy and token accuracy are logged. Under DeepSpeed or on a GPU
    TRL's path is kept.
    """
    from trl import SFTTrainer

    class TrainedTokenSFTTrainer(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            """The schedule of every trainer (align/schedule.py): warm-up `args.warmup_steps` (a ratio),
            cosine to `lr_scheduler_kwargs`' min_lr_rate (0 without); the first step trains."""
            if self.lr_scheduler is None:
                warmup = warmup_steps(num_training_steps, self.args.warmup_steps)
                floor = (self.args.lr_scheduler_kwargs or {}).get("min_lr_rate", 0.0)
                self.lr_scheduler = lr_scheduler(optimizer or self.optimizer, warmup, num_training_steps, floor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            labels = inputs.get("labels")
            if (
                return_outputs
                or labels is None
                or labels.device.type != "cpu"
                or self.is_deepspeed_enabled
                or self.aux_loss_enabled
                or self.args.loss_type != "nll"
                or self.label_smoother is not None
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            shifted = labels[:, 1:]
            keep = (shifted != -100).any(0).nonzero().squeeze(-1)
            if keep.numel() == 0:  # nothing trained in this micro-batch: a differentiable zero
                keep = torch.zeros(1, dtype=torch.long, device=labels.device)
            fwd = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
            logits = model(**fwd, use_cache=False, logits_to_keep=keep).logits
            loss, entropy_sum, hits, n = trained_token_loss(logits, shifted[:, keep], num_items_in_batch)
            n_valid = max(int(n), 1)
            self._metrics[mode]["entropy"].append(entropy_sum.item() / n_valid)
            self._metrics[mode]["mean_token_accuracy"].append(hits.item() / n_valid)
            if mode == "train":
                mask = inputs.get("attention_mask")  # absent when packed padding-free
                self._total_train_tokens += int(mask.sum()) if mask is not None else inputs["position_ids"].size(1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return TrainedTokenSFTTrainer


def grads_finite(params) -> bool:
    """True when every gradient of `params` is finite (parameters without a gradient count as finite)."""
    import torch

    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


class FiniteStepGuard:
    """Wraps an optimizer's `step`: non-finite gradients either stop the stage BEFORE the update
    (mode 'stop'; the last checkpoint on disk is the last good state) or skip that step (mode 'skip';
    gradients dropped, weights and optimizer moments untouched) and count it in `skipped`.

    The Trainer clips first; a NaN/inf gradient makes the clipped gradients non-finite too, so one
    check covers both a non-finite loss and a non-finite gradient."""

    def __init__(self, optimizer, mode: str, step_of):
        self.optimizer, self.mode, self.step_of = optimizer, mode, step_of
        self.skipped = 0
        self._step = optimizer.step
        optimizer.step = self.step

    def step(self, *args, **kwargs):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if grads_finite(params):
            return self._step(*args, **kwargs)
        step = self.step_of() + 1
        if self.mode == "stop":
            raise AlignError(
                f"non-finite loss or gradient at step {step}: the stage stopped before applying it "
                f"and the last good checkpoint is kept; lower the learning rate or check the data "
                f"(or set train.nonfinite=skip to skip such steps)"
            )
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        print(f"[align] step {step}: non-finite gradient, optimizer step skipped ({self.skipped} so far)", flush=True)
        return None


def _metrics_callback(logger, nonfinite: str = "stop"):
    from transformers import TrainerCallback

    class ToMetrics(TrainerCallback):
        """Mirrors Trainer logs into metrics.jsonl under `train/` names; guards the optimizer step
        against non-finite gradients (one process; under ZeRO-3 a non-finite logged loss stops the stage)."""

        guard = None

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None and args.deepspeed is None:
                self.guard = FiniteStepGuard(
                    getattr(optimizer, "optimizer", optimizer), nonfinite, lambda: state.global_step
                )

        def on_log(self, args, state, control, logs=None, **kwargs):
            fault("sft_step")
            logs = logs or {}
            for k in ("loss", "grad_norm"):
                if k in logs and not math.isfinite(float(logs[k])) and nonfinite == "stop":
                    raise AlignError(
                        f"non-finite {k} ({logs[k]}) at step {state.global_step}: lower the "
                        f"learning rate or check the data; the last good checkpoint is kept"
                    )
            if self.guard is not None and "loss" in logs:  # step rows only, not the end-of-training summary
                logs = {**logs, "skipped_steps": self.guard.skipped}
            if state.is_world_process_zero:
                names = {
                    "loss": "train/loss",
                    "learning_rate": "train/lr",
                    "grad_norm": "train/grad_norm",
                    "entropy": "train/entropy",
                    "mean_token_accuracy": "train/token_accuracy",
                    "num_tokens": "train/num_tokens",
                    "skipped_steps": "train/skipped_steps",
                }
                row = {names[k]: v for k, v in logs.items() if k in names and isinstance(v, (int, float))}
                if row:
                    logger.log(row, state.global_step)

    return ToMetrics()


def trainer_args(ctx, tcfg, max_length: int, packing: bool, deepspeed: str | None):
    """TRL's SFTConfig for a `TrainConfig`: checkpoints in `work_dir/checkpoints`, align's schedule."""
    import torch
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(
        output_dir=str(ctx.work_dir / "checkpoints"),
        max_length=max_length,
        packing=packing,
        packing_strategy="bfd",
        per_device_train_batch_size=tcfg.micro_batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.lr,
        # The schedule is align/schedule.py's (TrainedTokenSFTTrainer.create_scheduler reads these two).
        lr_scheduler_type="cosine_with_min_lr" if tcfg.min_lr_ratio > 0 else "cosine",
        lr_scheduler_kwargs={"min_lr_rate": tcfg.min_lr_ratio} if tcfg.min_lr_ratio > 0 else None,
        warmup_steps=tcfg.warmup_ratio,
        weight_decay=tcfg.weight_decay,
        num_train_epochs=tcfg.epochs,
        max_steps=tcfg.max_steps,
        max_grad_norm=tcfg.max_grad_norm,
        bf16=ctx.cfg.compute.bf16,
        gradient_checkpointing=tcfg.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        logging_steps=tcfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must stop the run, not be hidden from the log
        report_to=[],
        seed=ctx.cfg.seed,
        data_seed=ctx.cfg.seed,
        dataloader_num_workers=0,
        deepspeed=deepspeed,
        disable_tqdm=not ctx.is_main,
        save_only_model=False,
    )


def load_trainee(ctx, tcfg, tokenizer, packing: bool):
    """The init policy as the trainer gets it: LoRA trains small fp32 adapters over frozen base weights kept
    in the run's precision; full fine-tuning keeps fp32 master weights (under bf16 autocast where the
    precision is bf16). Packed rows attend per sequence; decoder layers compiled when asked."""
    from align.models import compile_layers, load_causal_lm

    model = load_causal_lm(ctx.init_model_dir, ctx.cfg.compute.dtype if tcfg.lora.enabled else "float32")
    model.config.pad_token_id = tokenizer.pad_token_id
    if packing:
        # TRL packs padding-free (one row per micro-batch); without flash-attention-2, sdpa would attend over
        # the whole row (align/attention.py): attention runs per packed sequence instead.
        from align.attention import use_varlen

        use_varlen(model)
    compile_layers(model, tcfg.compile)  # per decoder layer, not TRL's `torch_compile` of the whole model
    return model


def fit(ctx, trainer, deepspeed: str | None) -> float:
    """Train, resuming from the newest complete checkpoint; a finished run is loaded, not retrained.
    Returns the training seconds of this call."""
    found = latest_checkpoint(ctx.work_dir / "checkpoints", "checkpoint", state=TRAINER_STATE)
    resume = str(found) if found else None
    if resume and ctx.is_main:
        print(f"[align] {ctx.name}: resuming from {resume}", flush=True)
    if resume and _finished(resume) and not deepspeed:  # (under ZeRO-3 the engine must load it)
        # transformers 5 trains one step past max_steps when resumed from the final checkpoint (measured:
        # max_steps=2, resumed from checkpoint-2 -> global_step 3), so a finished run is loaded, not resumed
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / TRAINER_STATE))
        return 0.0
    return float(trainer.train(resume_from_checkpoint=resume).metrics.get("train_runtime", 0.0))


def train_sft(ctx, dataset, tcfg, max_length: int, packing: bool) -> dict:
    """Fine-tune `ctx.init_model_dir` on a tokenised dataset; writes `out_dir/model` (+ `adapter`).

    Shared by SFT, rejection sampling and GAtt. Resumes from `work_dir/checkpoints` when present.
    """
    from align.models import load_tokenizer, peft_lora_config

    tokenizer = load_tokenizer(ctx.init_model_dir)
    # Under `accelerate launch` the ZeRO-3 JSON written by the launcher is handed to the Trainer too.
    deepspeed = str(ctx.work_dir / "launch" / "ds_zero3.json") if ctx.world_size > 1 else None
    if deepspeed:
        from align.launch import init_distributed

        init_distributed()
    args = trainer_args(ctx, tcfg, max_length, packing, deepspeed)
    model = load_trainee(ctx, tcfg, tokenizer, packing)
    logger = ctx.logger()
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(tcfg.lora, model.config.num_hidden_layers) if tcfg.lora.enabled else None,
        callbacks=[_metrics_callback(logger, tcfg.nonfinite)],
    )
    runtime = fit(ctx, trainer, deepspeed)
    logger.close()
    save_policy(trainer, tokenizer, ctx, tcfg.lora.enabled)
    if deepspeed:  # a model rank 0 loads alone from here on must load whole, not partitioned
        from align.launch import release_zero3_loading

        release_zero3_loading()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "train/loss_first": float(history[0]["loss"]) if history else float("nan"),
        "train/loss_last": float(history[-1]["loss"]) if history else float("nan"),
        "train/steps": int(trainer.state.global_step),
        "train/runtime_s": runtime,
        "model_dir": str(ctx.run_dir / ctx.name / "model"),
    }


def save_policy(trainer, tokenizer, ctx, lora: bool) -> None:
    """Write `out_dir/model` (a full checkpoint that loads with from_pretrained) and, for LoRA, `adapter/`."""
    out = ctx.out_dir
    if lora:
        trainer.save_model(str(out / "adapter"))  # under ZeRO-3 this gathers the adapter on rank 0
        if ctx.is_main:
            from peft import PeftModel

            from align.models import load_causal_lm

            base = load_causal_lm(ctx.init_model_dir, "float32")
            merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
            merged.save_pretrained(str(out / "model"), safe_serialization=True)
    else:
        trainer.save_model(str(out / "model"))
    if ctx.is_main:
        tokenizer.save_pretrained(str(out / "model"))
    trainer.accelerator.wait_for_everyone()


def run_sft(ctx: StageContext) -> dict:
    from align.data.load import load_datasets
    from align.models import load_tokenizer

    cfg = ctx.stage_cfg
    tokenizer = load_tokenizer(ctx.init_model_dir)
    records, reports = load_datasets(
        cfg.datasets, "conversation", Path(ctx.cfg.data_dir), ctx.cfg.data.bad_rows, ctx.cfg.seed
    )
    train_records, test_records, split_stats = split_records(
        list(records), cfg.test_size, ctx.cfg.seed, ctx.cfg.data.dedup
    )
    dataset, stats = tokenize_conversations(tokenizer, train_records, cfg.max_length)
    if ctx.is_main:
        print(
            f"[align] {ctx.name}: {stats['data/conversations']} conversations, {stats['data/tokens']} tokens "
            f"({stats['data/answer_tokens']} trained), {stats['data/dropped_too_long']} too long"
            f"{f', {len(test_records)} held out' if test_records else ''}",
            flush=True,
        )
    test_rows = tokenize_conversations(tokenizer, test_records, cfg.max_length)[0] if test_records else []
    before = answer_losses(ctx.init_model_dir, ctx.cfg.compute.dtype, test_rows) if ctx.is_main else []
    summary = train_sft(ctx, dataset, cfg.train, cfg.max_length, cfg.packing)
    skipped = sum(sum(r.skipped.values()) for r in reports)
    return {
        **stats,
        "data/bad_rows_skipped": skipped,
        **split_stats,
        **summary,
        **_heldout_summary(ctx, before, test_rows),
    }


def _heldout_summary(ctx, before: list[float], test_rows) -> dict:
    """The held-out answer loss before and after training, and its change with a 95% interval."""
    if not before:
        return {}
    from align.stats import bootstrap_mean, fmt_change, paired_change

    after = answer_losses(ctx.out_dir / "model", ctx.cfg.compute.dtype, test_rows)
    change = paired_change(before, after, seed=ctx.cfg.seed)
    print(
        f"[align] {ctx.name}: held-out answer loss {sum(before) / len(before):.3f} -> "
        f"{sum(after) / len(after):.3f}, change {fmt_change(change)}",
        flush=True,
    )
    out = {
        "heldout/n": len(before),
        "heldout/loss_change": change["change"],
        "heldout/loss_change_lo": change["lo"],
        "heldout/loss_change_hi": change["hi"],
        "heldout/within_noise": change["within_noise"],
    }
    for name, values in (("before", before), ("after", after)):
        mean, lo, hi = bootstrap_mean(values, seed=ctx.cfg.seed)
        out.update({f"heldout/loss_{name}": mean, f"heldout/loss_{name}_lo": lo, f"heldout/loss_{name}_hi": hi})
    return out
