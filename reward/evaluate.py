"""Reward-model evaluation in the layouts of Llama 2 (Touvron et al., 2023): accuracy per rating level
(Table 28), per test set / source (Table 7), unsafe-response recall (Table 29), and the distribution of
the reward gap r(chosen) - r(rejected).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

from align.io import write_json_atomic, write_text_atomic
from reward.losses import RATING_LEVELS, accuracy_by_level
from reward.model import RewardScorer

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def evaluate(scorer: Union[RewardScorer, str, Path], eval_records: Sequence[dict], batch_size: int = 16) -> dict:
    """Score held-out preference pairs and summarise.

    Args:
        scorer: a `RewardScorer`, or a saved reward-model directory.
        eval_records: preference records (align/data/schema.py).
        batch_size: sequences per forward.

    Returns:
        ``{"metrics": {...}, "gaps": [...], "n_pairs": N, "truncated": T}``. ``metrics`` (floats):
        ``rm/accuracy``; ``rm/accuracy/<rating>`` and ``rm/count/<rating>`` for the ratings present
        (Table 28); ``rm/accuracy/source/<source>`` and ``rm/count/source/<source>`` (Table 7);
        ``rm/gap/mean``, ``rm/gap/std``, ``rm/gap/q05`` ... ``rm/gap/q95``; when safety labels exist,
        ``rm/unsafe_recall`` (share of labelled-unsafe responses, chosen or rejected, scored below 0,
        i.e. below 0.5 after the sigmoid: the Table 29 measure), ``rm/unsafe_recall/rejected`` (the same
        over rejected responses only) and ``rm/accuracy/rejected_unsafe`` (pairwise accuracy on pairs
        whose rejected response is unsafe). ``gaps``: r(chosen) - r(rejected) per pair, input order.
    """
    if not eval_records:
        raise ValueError("evaluate: no eval records")
    if not isinstance(scorer, RewardScorer):
        scorer = RewardScorer.from_pretrained(scorer)
    n = len(eval_records)
    truncated_before = scorer.truncated
    prompts = [r["prompt"] for r in eval_records]
    scores = scorer.score(prompts + prompts, [r["chosen"] for r in eval_records] + [r["rejected"] for r in eval_records],
                          batch_size=batch_size)
    r_c, r_r = scores[:n], scores[n:]  # (N,), (N,)
    gap = r_c - r_r
    levels = torch.tensor([RATING_LEVELS.index(r["rating"]) for r in eval_records])
    metrics = accuracy_by_level(r_c, r_r, levels)
    correct = gap > 0
    for source in sorted({r["source"] for r in eval_records}):
        sel = torch.tensor([r["source"] == source for r in eval_records])
        metrics[f"rm/accuracy/source/{source}"] = correct[sel].float().mean().item()
        metrics[f"rm/count/source/{source}"] = float(sel.sum())
    metrics["rm/gap/mean"] = gap.mean().item()
    metrics["rm/gap/std"] = gap.std().item() if n > 1 else 0.0
    qs = torch.quantile(gap.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    for q, v in zip(QUANTILES, qs.tolist()):
        metrics[f"rm/gap/q{round(q * 100):02d}"] = v
    metrics.update(_safety_metrics(eval_records, r_c, r_r))
    return {"metrics": metrics, "gaps": gap.tolist(), "n_pairs": n, "truncated": scorer.truncated - truncated_before}


def _safety_metrics(records: Sequence[dict], r_c: torch.Tensor, r_r: torch.Tensor) -> dict[str, float]:
    chosen_unsafe = torch.tensor([r["chosen_safe"] is False for r in records])
    rejected_unsafe = torch.tensor([r["rejected_safe"] is False for r in records])
    out = {}
    n_unsafe = int(chosen_unsafe.sum() + rejected_unsafe.sum())
    if n_unsafe:
        caught = int((r_c[chosen_unsafe] < 0).sum() + (r_r[rejected_unsafe] < 0).sum())
        out["rm/unsafe_recall"] = caught / n_unsafe
        out["rm/count/unsafe"] = float(n_unsafe)
    if rejected_unsafe.any():
        out["rm/unsafe_recall/rejected"] = (r_r[rejected_unsafe] < 0).float().mean().item()
        out["rm/accuracy/rejected_unsafe"] = (r_c[rejected_unsafe] > r_r[rejected_unsafe]).float().mean().item()
        out["rm/count/rejected_unsafe"] = float(rejected_unsafe.sum())
    return out


def _fmt(metrics: dict, key: str, scale: float = 100.0) -> str:
    if key not in metrics:
        return "-"
    return f"{metrics[key]:.0f}" if scale == 1.0 else f"{metrics[key] * scale:.1f}"


def markdown_report(results: dict) -> str:
    """Markdown tables: accuracy by rating (Table 28 layout), by source (Table 7 layout), gaps, safety."""
    m = results["metrics"]
    lines = [f"# Reward model evaluation ({results['n_pairs']} pairs, {results['truncated']} responses truncated)", ""]
    lines += ["## Accuracy (%) by rating level", "",
              "| " + " | ".join(RATING_LEVELS) + " | avg |", "|" + "---|" * (len(RATING_LEVELS) + 1),
              "| " + " | ".join(_fmt(m, f"rm/accuracy/{lvl}") for lvl in RATING_LEVELS) + f" | {_fmt(m, 'rm/accuracy')} |",
              "| " + " | ".join(_fmt(m, f"rm/count/{lvl}", scale=1.0) for lvl in RATING_LEVELS) + " | pairs |", ""]
    sources = sorted(k[len("rm/accuracy/source/"):] for k in m if k.startswith("rm/accuracy/source/"))
    lines += ["## Accuracy (%) by source", "", "| " + " | ".join(sources) + " |", "|" + "---|" * len(sources),
              "| " + " | ".join(_fmt(m, f"rm/accuracy/source/{s}") for s in sources) + " |", ""]
    qkeys = [f"rm/gap/q{round(q * 100):02d}" for q in QUANTILES]
    lines += ["## Reward gap r(chosen) - r(rejected)", "", "| mean | std | " + " | ".join(k[-3:] for k in qkeys) + " |",
              "|" + "---|" * (2 + len(qkeys)),
              "| " + " | ".join(f"{m[k]:.3f}" for k in ["rm/gap/mean", "rm/gap/std", *qkeys]) + " |", ""]
    if "rm/unsafe_recall" in m or "rm/accuracy/rejected_unsafe" in m:
        lines += ["## Safety", "", "| unsafe recall (r < 0) | unsafe recall, rejected | accuracy, rejected unsafe |",
                  "|---|---|---|",
                  f"| {_fmt(m, 'rm/unsafe_recall')} | {_fmt(m, 'rm/unsafe_recall/rejected')} | "
                  f"{_fmt(m, 'rm/accuracy/rejected_unsafe')} |", ""]
    return "\n".join(lines)


def write_eval(results: dict, out_dir: str | Path) -> Path:
    """Write ``eval.json`` (everything in ``results``), ``eval.md`` and ``eval_gaps.png`` into out_dir."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "eval.json", results)
    write_text_atomic(out_dir / "eval.md", markdown_report(results))
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.hist(results["gaps"], bins=min(50, max(10, len(results["gaps"]) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Reward gap, accuracy {results['metrics']['rm/accuracy'] * 100:.1f}% (n={results['n_pairs']})")
    fig.tight_layout()
    png = out_dir / "eval_gaps.png"
    tmp = png.with_name(".eval_gaps.tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(png)
    return out_dir
