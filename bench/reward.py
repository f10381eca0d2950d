"""Reward-model training throughput at equal quality: our loop vs TRL's RewardTrainer, same model, data,
batch, learning rate and schedule.

    .venv/bin/python bench/reward.py [--train-pairs 480] [--test-pairs 150] [--max-length 256] [--model embedded|tiny|DIR]

SmolLM2-135M-Instruct in the run's precision (--precision, auto: bf16 on a CPU with bf16 units, else
fp32), batch 8, one pass over the same HH-RLHF harmless pairs (no margin: HH has no rating levels),
cosine schedule at the default safety RM's learning rate. Both models are then scored by the same
evaluation code on the same held-out pairs (whole prompts held out), so the speed ratio is read next to
both accuracies: a ratio between two models that learned nothing measures nothing. Prints pairs/s of
each, their ratio and both held-out accuracies with 95% intervals; writes bench/out/reward.json (--out).
TRL drops pairs longer than max_length; we truncate the prompt from the left instead, so both counts
are printed.

Ours runs as the default's `rm_safety` stage does (configs/default.yaml: its lr, freeze_layers and
compile; each decoder layer torch.compiled, the one-off compile inside the measured time) with
`micro_batch_tokens: 2048`. TRL's RewardTrainer trains every layer, as its users run it.
`--freeze-layers 0 --eager` measures ours without those levers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_pairs(n_train: int, n_test: int, seed: int = 0):
    from align.config import DatasetSpec
    from align.data.load import load_records
    from reward.mixture import holdout

    data = ROOT.parent / "shared" / "data"
    spec = DatasetSpec(format="hh", path="hh-rlhf/harmless-base-test.dev.jsonl.gz")
    records, _ = load_records(spec, "preference", data, "skip", seed)
    train, test = holdout(records, n_test, seed)
    return train[:n_train], test


def run_ours(model_dir, tok, train, test, args) -> dict:
    from align.config import RewardConfig, TrainConfig, DatasetSpec
    from reward.train import train_reward_model

    cfg = RewardConfig(
        category="safety",
        primary=(DatasetSpec(format="synthetic_pref"),),
        margin="none",
        max_length=args.max_length,
        test_size=0,
        micro_batch_tokens=args.micro_batch_tokens,
        freeze_layers=args.freeze_layers,
        train=TrainConfig(
            lr=args.lr,
            min_lr_ratio=0.0,
            epochs=1.0,
            batch_size=args.batch,
            micro_batch_size=args.batch,
            save_steps=10**6,
            warmup_ratio=0.0,
            compile=not args.eager,
        ),
    )
    with tempfile.TemporaryDirectory() as out:
        s = train_reward_model(model_dir, tok, train, test, cfg, out, seed=0, bf16=args.bf16)
    return {
        "pairs_per_s": s["pairs_per_s"],
        "train_pairs": s["train_pairs"],
        "seconds": s["train_seconds"],
        **heldout(s["eval"]),
        "truncated_pairs": s["truncated_pairs"],
    }


def heldout(metrics: dict) -> dict:
    return {
        "heldout_accuracy": metrics["rm/accuracy"],
        "heldout_ci": [metrics["rm/accuracy/ci_low"], metrics["rm/accuracy/ci_high"]],
    }


def run_trl(model_dir, tok, train, test, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from reward.evaluate import evaluate
    from reward.model import RewardScorer

    rows = [
        {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in train
    ]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        targs = TRLRewardConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            num_train_epochs=1,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            bf16=args.bf16,
            use_cpu=True,
            max_length=args.max_length,
            report_to=[],
            save_strategy="no",
            logging_steps=10,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        trainer = RewardTrainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tok)
        kept = len(trainer.train_dataset)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    results = evaluate(RewardScorer(model, tok, max_length=args.max_length), test)
    return {
        "pairs_per_s": kept / seconds,
        "train_pairs": kept,
        "seconds": seconds,
        **heldout(results["metrics"]),
        "dropped_pairs": len(rows) - kept,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-pairs", type=int, default=480)
    p.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny' or a local HF model directory"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "reward.json"), help="JSON output")
    p.add_argument("--test-pairs", type=int, default=150)
    p.add_argument("--max-length", type=int, default=None, help="default: the default safety RM's")
    p.add_argument("--lr", type=float, default=None, help="both sides (default: the default safety RM's)")
    p.add_argument("--freeze-layers", type=int, default=None, help="ours (default: the default safety RM's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-trl", action="store_true", help="measure ours only")
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=2048,
        help="ours: cut a micro-batch padded past this many tokens into pieces (0 = off)",
    )
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="both sides' precision")
    p.add_argument(
        "--eager", action="store_true", help="ours without torch.compile of the decoder layers (train.compile)"
    )
    args = p.parse_args()

    import torch

    from align.models import model_dir_from_arg, load_tokenizer
    from align.precision import hardware, hardware_line, resolve_precision

    from align.config import load_config

    rm = load_config(ROOT / "configs" / "default.yaml").stage("rm_safety")
    args.max_length = rm.max_length if args.max_length is None else args.max_length
    args.lr = rm.train.lr if args.lr is None else args.lr
    args.freeze_layers = rm.freeze_layers if args.freeze_layers is None else args.freeze_layers
    precision = resolve_precision(args.precision)
    args.bf16 = precision.bf16
    print(hardware_line(precision), flush=True)
    from align.stats import fmt_share
    from reward.evaluate import evaluate
    from reward.model import RewardScorer

    model_dir = model_dir_from_arg(args.model)
    tok = load_tokenizer(model_dir)
    train, test = load_pairs(args.train_pairs, args.test_pairs)
    print(
        f"{'SmolLM2-135M-Instruct' if args.model == 'embedded' else args.model}, {len(train)} train / {len(test)} held-out HH harmless pairs, batch {args.batch}, "
        f"lr {args.lr:g}, max_length {args.max_length}, ours freeze_layers {args.freeze_layers}, {precision.name}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    torch.manual_seed(0)  # the untrained score head: the same random head every run
    untrained = heldout(evaluate(RewardScorer.from_pretrained(model_dir, max_length=args.max_length), test)["metrics"])
    ours = run_ours(model_dir, tok, train, test, args)
    trl = None if args.skip_trl else run_trl(model_dir, tok, train, test, args)
    acc = lambda r: fmt_share(r["heldout_accuracy"], *r["heldout_ci"], len(test))
    print("\n| engine | pairs/s | train pairs | seconds | held-out accuracy [95% CI] |\n|---|---|---|---|---|")
    print(f"| untrained | - | - | - | {acc(untrained)} |")
    print(f"| ours | {ours['pairs_per_s']:.2f} | {ours['train_pairs']} | {ours['seconds']:.0f} | {acc(ours)} |")
    if trl:
        print(
            f"| TRL RewardTrainer | {trl['pairs_per_s']:.2f} | {trl['train_pairs']} (dropped {trl['dropped_pairs']}) | "
            f"{trl['seconds']:.0f} | {acc(trl)} |"
        )
        print(
            f"\nratio ours / TRL pairs/s: {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x "
            f"(held-out accuracy ours {ours['heldout_accuracy'] * 100:.1f}%, TRL {trl['heldout_accuracy'] * 100:.1f}%)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "hardware": hardware(),
                "precision": precision.as_dict(),
                "untrained": untrained,
                "ours": ours,
                "trl": trl,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
