"""Reward-model stages `rm_helpful` and `rm_safety` (Llama 2 sec. 3.2.2).

setup (data: held-out split per source, then the recipe's mixture) -> train (reward/train.py,
resumable from the stage's work directory) -> save (model/ with scorer.json, eval.json, eval.md, eval_gaps.png, eval_calibration.png).
With `train.num_processes` N > 1 the pipeline runs this on N ranks under DeepSpeed ZeRO-3 (reward/train.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import AlignError

if TYPE_CHECKING:
    from align.pipeline import StageContext


def load_pairs(ctx_cfg, specs, seed: int):
    from align.data.load import load_datasets

    if not specs:
        return [], []
    ds, reports = load_datasets(specs, "preference", Path(ctx_cfg.data_dir), ctx_cfg.data.bad_rows, seed)
    return ds.to_list(), reports


def build_splits(cfg, pipeline_cfg, seed: int, label_exports=()) -> tuple[list[dict], list[dict], dict]:
    """(train mixture, held-out test pairs, data stats) for one reward-model config."""
    from align.data.dedup import drop_duplicates, drop_overlap
    from reward.mixture import balance_length, holdout, mix

    primary, p_reports = load_pairs(pipeline_cfg, cfg.primary, seed)
    secondary, s_reports = load_pairs(pipeline_cfg, cfg.secondary, seed)
    # Pairs labeled in the run's earlier labeling rounds (all of them: the recipe retrains on all
    # rounds' data): this RM's own category joins its primary data, the other its secondary data.
    for export in label_exports:
        from align.config import DatasetSpec

        rows, reports = load_pairs(pipeline_cfg, (DatasetSpec(format="trl_jsonl", path=str(export.resolve())),), seed)
        primary += [r for r in rows if r["category"] == cfg.category]
        secondary += [r for r in rows if r["category"] != cfg.category]
        p_reports += reports
    p_dups = s_dups = 0
    if pipeline_cfg.data.dedup:  # an exact copy of a pair, in any dataset of either side, is dropped: the first kept
        primary, p_dups = drop_duplicates(primary)
        secondary, s_dups = drop_duplicates(secondary, seen=primary)
    p_train, p_test = holdout(primary, cfg.test_size, seed, cfg.test_pairs_per_prompt)
    s_train, s_test = holdout(secondary, cfg.test_size, seed, cfg.test_pairs_per_prompt)
    # holdout keeps whole prompts out of its own source's training pairs; a held-out prompt that another
    # source (or the other mixture side) also has leaves that training side, so the test set stays as drawn.
    test = p_test + s_test
    (p_train, p_overlap), (s_train, s_overlap) = drop_overlap(p_train, test), drop_overlap(s_train, test)
    if cfg.balance_length:
        p_train, s_train = balance_length(p_train, seed), balance_length(s_train, seed)
    train = mix(p_train, s_train, cfg.secondary_share if secondary else 0.0, seed)
    if not train:
        raise AlignError("reward model: no training pairs after the held-out split; add data or lower test_size")
    stats = {
        "data/primary_pairs": len(primary),
        "data/secondary_pairs": len(secondary),
        "data/train_pairs": len(train),
        "data/test_pairs": len(p_test) + len(s_test),
        "data/bad_rows_skipped": sum(r.n_skipped for r in p_reports + s_reports),
        "data/duplicates_dropped": p_dups + s_dups,
        "data/heldout_overlap_dropped": p_overlap + s_overlap,
    }
    return train, test, stats


def run_reward(ctx: StageContext) -> dict:
    """The stage on this rank (every rank of a multi-process stage runs it); the summary on rank 0, {} elsewhere."""
    from align.io import read_json
    from align.models import load_tokenizer
    from reward.train import train_reward_model

    cfg = ctx.stage_cfg
    exports = [d / "preference.jsonl" for d in ctx.earlier("label") if (d / "preference.jsonl").is_file()]
    train, test, stats = build_splits(cfg, ctx.cfg, ctx.cfg.seed, exports)
    stats["data/label_rounds"] = len(exports)
    if ctx.is_main:
        print(
            f"[align] {ctx.name}: {stats['data/train_pairs']} training pairs "
            f"({stats['data/primary_pairs']} primary, {stats['data/secondary_pairs']} secondary available), "
            f"{stats['data/test_pairs']} held out",
            flush=True,
        )
    tokenizer = load_tokenizer(ctx.init_model_dir)
    logger = ctx.logger() if ctx.is_main else None
    # written by the pipeline's launcher (align/launch) for a stage on several processes
    ds_config = read_json(ctx.work_dir / "launch" / "ds_zero3.json") if ctx.world_size > 1 else None
    # Checkpoints live in the work directory so a killed stage resumes; finished outputs move to out_dir.
    summary = train_reward_model(
        ctx.init_model_dir,
        tokenizer,
        train,
        test,
        cfg,
        ctx.work_dir,
        ctx.cfg.seed,
        logger=logger,
        bf16=ctx.cfg.compute.bf16,
        ds_config=ds_config,
    )
    if not ctx.is_main:
        return {}
    logger.close()
    for name in ("model", "eval.json", "eval.md", "eval_gaps.png", "eval_calibration.png", "train_summary.json"):
        src = ctx.work_dir / name
        if src.exists():
            shutil.move(str(src), str(ctx.out_dir / name))
    out = {
        **stats,
        "rm/steps": summary["steps"],
        "rm/pairs_per_s": summary["pairs_per_s"],
        "rm/truncated_pairs": summary["truncated_pairs"],
        "model_dir": str(ctx.run_dir / ctx.name / "model"),
    }
    for k, v in summary.get("eval", {}).items():
        out[f"eval/{k}" if not k.startswith("eval/") else k] = v
    for category, metrics in summary.get("eval_by_category", {}).items():
        out.update({f"eval/{category}/{k}": v for k, v in metrics.items()})
        print(f"[align] {ctx.name}: held-out {category} pairs: {headline(metrics)}", flush=True)
    return out


def headline(m: dict) -> str:
    """One line of `reward.evaluate.summary_metrics`: accuracy [CI] (n), length-balanced, longer wins."""
    from align.stats import fmt_share

    return (
        f"accuracy {fmt_share(m['rm/accuracy'], m['rm/accuracy/ci_low'], m['rm/accuracy/ci_high'], int(m['rm/n']))}, "
        f'length-balanced {m["rm/length/balanced_accuracy"] * 100:.1f}%, "longer wins" '
        f"{m['rm/length/longer_wins'] * 100:.1f}%, corr(reward, tokens) {m['rm/length/reward_corr']:+.2f}, "
        f"ECE {m['rm/calibration/ece'] * 100:.1f}%"
    )
