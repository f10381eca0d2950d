"""Reward-model evaluation in the layouts of Llama 2 (Touvron et al., 2023): accuracy per rating level
(Table 28), per test set / source (Table 7), unsafe-response recall (Table 29), and the distribution of
the reward gap r(chosen) - r(rejected); then what a length-counting rule would score on the same pairs
and how well the reward's probabilities are calibrated.

Why length: in the AlpacaEval GPT-4 pairs the chosen answer is the longer one 79% of the time, in the HH
harmless pairs 45% (SmolLM2 tokens). An RM that learned "longer is better" scores ~79% on the first and
below chance on the second. So every evaluation prints, beside accuracy, the length-balanced accuracy
(the mean of the accuracies on the pairs whose chosen answer is longer and on those where it is
shorter: 50% for any rule of length alone), the "longer wins" rule's accuracy and the correlation of
the reward with the response's token count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import torch

from align.io import write_json_atomic, write_text_atomic
from align.stats import pearson, wilson
from reward.losses import RATING_LEVELS, accuracy_by_level
from reward.model import RewardScorer

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CALIBRATION_BINS = 10


# ---------------------------------------------------------------------------------------------------
# Pure metrics


def length_controlled(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor
) -> dict[str, float]:
    """Accuracy with the responses' length taken out of it.

    Args:
        r_chosen, r_rejected: (N,) rewards.
        len_chosen, len_rejected: (N,) response lengths in tokens.

    Returns:
        ``rm/length/accuracy_chosen_longer`` and ``.../accuracy_chosen_shorter`` with their counts
        ``rm/length/count_chosen_longer`` / ``..._shorter`` (pairs of equal length are in neither),
        ``rm/length/balanced_accuracy`` (their mean; NaN when either group is empty), ``rm/length/
        longer_wins`` (accuracy of the rule "the longer answer is chosen", a tie counting half),
        ``rm/length/reward_corr`` (Pearson's r between reward and token count over all 2N responses).
    """
    correct = (r_chosen > r_rejected).float()
    longer, shorter = len_chosen > len_rejected, len_chosen < len_rejected
    n_long, n_short = int(longer.sum()), int(shorter.sum())
    acc_long = correct[longer].mean().item() if n_long else float("nan")
    acc_short = correct[shorter].mean().item() if n_short else float("nan")
    n = correct.numel()
    rule = (n_long + 0.5 * (n - n_long - n_short)) / n if n else float("nan")
    rewards = torch.cat([r_chosen, r_rejected]).tolist()
    lengths = torch.cat([len_chosen, len_rejected]).float().tolist()
    return {
        "rm/length/balanced_accuracy": (acc_long + acc_short) / 2,  # NaN if either is
        "rm/length/accuracy_chosen_longer": acc_long,
        "rm/length/accuracy_chosen_shorter": acc_short,
        "rm/length/count_chosen_longer": float(n_long),
        "rm/length/count_chosen_shorter": float(n_short),
        "rm/length/longer_wins": rule,
        "rm/length/reward_corr": pearson(rewards, lengths),
    }


def calibration(gaps: torch.Tensor, n_bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of P(chosen) = sigmoid(r_c - r_r) against the observed rate, in ``n_bins`` equal bins.

    Each pair is read in both orders: as (p, chosen) and as (1 - p, not chosen), so the observed rate
    of a bin is the share of its predictions that named the chosen answer (read one way only, every
    outcome would be "chosen" and any RM that says p = 1 would look calibrated).

    Args:
        gaps: (N,) r(chosen) - r(rejected).

    Returns:
        ``{"bins": [{"lo", "hi", "count", "confidence", "observed"}], "ece": float}``: per bin its
        edges, predictions, mean predicted probability and observed rate (None when empty); ``ece``
        the expected calibration error, sum over bins of count/total * |confidence - observed|.
    """
    p = torch.sigmoid(gaps.double())
    conf = torch.cat([p, 1 - p])
    hit = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    idx = (conf * n_bins).long().clamp(max=n_bins - 1)
    bins, ece, total = [], 0.0, conf.numel()
    for b in range(n_bins):
        sel = idx == b
        k = int(sel.sum())
        c = conf[sel].mean().item() if k else None
        o = hit[sel].mean().item() if k else None
        if k:
            ece += k / total * abs(c - o)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": k, "confidence": c, "observed": o})
    return {"bins": bins, "ece": ece if total else float("nan")}


def summary_metrics(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor
) -> dict[str, float]:
    """The headline block of one set of pairs: n, accuracy with its 95% Wilson interval, the
    `length_controlled` metrics and the calibration error."""
    n = r_chosen.numel()
    k = int((r_chosen > r_rejected).sum())
    lo, hi = wilson(k, n)
    return {
        "rm/n": float(n),
        "rm/accuracy": k / n if n else float("nan"),
        "rm/accuracy/ci_low": lo,
        "rm/accuracy/ci_high": hi,
        **length_controlled(r_chosen, r_rejected, len_chosen, len_rejected),
        "rm/calibration/ece": calibration(r_chosen - r_rejected)["ece"],
    }


# ---------------------------------------------------------------------------------------------------
# Evaluation of a scorer


def evaluate(scorer: Union[RewardScorer, str, Path], eval_records: Sequence[dict], batch_size: int = 16) -> dict:
    """Score held-out preference pairs and summarise.

    Args:
        scorer: a `RewardScorer`, or a saved reward-model directory (scored with its `scorer.json`).
        eval_records: preference records (align/data/schema.py).
        batch_size: sequences per forward.

    Returns:
        ``{"metrics": {...}, "by_category": {category: {...}}, "calibration": {...}, "gaps": [...],
        "n_pairs": N, "truncated": T}``. ``metrics`` (floats): `summary_metrics` over all pairs
        (``rm/accuracy`` with ``rm/accuracy/ci_low`` / ``ci_high``, ``rm/length/...``,
        ``rm/calibration/ece``); ``rm/accuracy/<rating>`` and ``rm/count/<rating>`` for the ratings
        present (Table 28); ``rm/accuracy/source/<source>``, ``rm/count/source/<source>`` and
        ``rm/balanced_accuracy/source/<source>`` (Table 7); ``rm/gap/mean``, ``rm/gap/std``,
        ``rm/gap/q05`` ... ``rm/gap/q95``; when safety labels exist, ``rm/unsafe_recall`` (share of
        labelled-unsafe responses, chosen or rejected, scored below 0, i.e. below 0.5 after the sigmoid:
        the Table 29 measure), ``rm/unsafe_recall/rejected`` and ``rm/accuracy/rejected_unsafe``.
        ``by_category``: `summary_metrics` of the helpfulness and of the safety pairs (the ones present).
        ``calibration``: `calibration` of all pairs. ``gaps``: r(chosen) - r(rejected) per pair.
    """
    if not eval_records:
        raise ValueError("evaluate: no eval records")
    if not isinstance(scorer, RewardScorer):
        scorer = RewardScorer.from_pretrained(scorer)
    n = len(eval_records)
    truncated_before = scorer.truncated
    prompts = [r["prompt"] for r in eval_records]
    chosen, rejected = [r["chosen"] for r in eval_records], [r["rejected"] for r in eval_records]
    scores = scorer.score(prompts + prompts, chosen + rejected, batch_size=batch_size)
    lengths = torch.tensor(scorer.response_tokens(chosen + rejected))
    r_c, r_r = scores[:n], scores[n:]  # (N,), (N,)
    len_c, len_r = lengths[:n], lengths[n:]
    gap = r_c - r_r
    levels = torch.tensor([RATING_LEVELS.index(r["rating"]) for r in eval_records])
    metrics = {**accuracy_by_level(r_c, r_r, levels), **summary_metrics(r_c, r_r, len_c, len_r)}
    correct = gap > 0
    for source in sorted({r["source"] for r in eval_records}):
        sel = torch.tensor([r["source"] == source for r in eval_records])
        metrics[f"rm/accuracy/source/{source}"] = correct[sel].float().mean().item()
        metrics[f"rm/count/source/{source}"] = float(sel.sum())
        metrics[f"rm/balanced_accuracy/source/{source}"] = length_controlled(
            r_c[sel], r_r[sel], len_c[sel], len_r[sel]
        )["rm/length/balanced_accuracy"]
    by_category = {}
    for category in ("helpfulness", "safety"):
        sel = torch.tensor([r["category"] == category for r in eval_records])
        if sel.any():
            by_category[category] = summary_metrics(r_c[sel], r_r[sel], len_c[sel], len_r[sel])
    metrics["rm/gap/mean"] = gap.mean().item()
    metrics["rm/gap/std"] = gap.std().item() if n > 1 else 0.0
    qs = torch.quantile(gap.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    for q, v in zip(QUANTILES, qs.tolist()):
        metrics[f"rm/gap/q{round(q * 100):02d}"] = v
    metrics.update(_safety_metrics(eval_records, r_c, r_r))
    return {
        "metrics": metrics,
        "by_category": by_category,
        "calibration": calibration(gap),
        "gaps": gap.tolist(),
        "n_pairs": n,
        "truncated": scorer.truncated - truncated_before,
    }


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


# ---------------------------------------------------------------------------------------------------
# Reports


def _fmt(metrics: dict, key: str, scale: float = 100.0) -> str:
    if key not in metrics or metrics[key] is None or (isinstance(metrics[key], float) and math.isnan(metrics[key])):
        return "-"
    return f"{metrics[key]:.0f}" if scale == 1.0 else f"{metrics[key] * scale:.1f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _summary_row(name: str, m: dict) -> str:
    acc = f"{_fmt(m, 'rm/accuracy')} [{_fmt(m, 'rm/accuracy/ci_low')}, {_fmt(m, 'rm/accuracy/ci_high')}]"
    corr = m.get("rm/length/reward_corr", float("nan"))
    return (
        f"| {name} | {m['rm/n']:.0f} | {acc} | {_fmt(m, 'rm/length/balanced_accuracy')} | "
        f"{_fmt(m, 'rm/length/accuracy_chosen_longer')} ({_fmt(m, 'rm/length/count_chosen_longer', 1.0)}) | "
        f"{_fmt(m, 'rm/length/accuracy_chosen_shorter')} ({_fmt(m, 'rm/length/count_chosen_shorter', 1.0)}) | "
        f"{_fmt(m, 'rm/length/longer_wins')} | {'-' if math.isnan(corr) else f'{corr:+.2f}'} | "
        f"{_fmt(m, 'rm/calibration/ece')} |"
    )


def markdown_report(results: dict) -> str:
    """Markdown tables: the length-controlled summary per category, accuracy by rating (Table 28
    layout), by source (Table 7 layout), gaps, calibration, safety."""
    m = results["metrics"]
    lines = [
        f"# Reward model evaluation ({results['n_pairs']} pairs, {results['truncated']} responses truncated)",
        "",
        "## Accuracy (%) and length",
        "",
        "Accuracy with its 95% Wilson interval; length-balanced = the mean of the accuracies on the pairs whose "
        'chosen answer is longer and shorter (pairs in each); "longer wins" = the rule that picks the longer '
        "answer; corr = Pearson's r of reward and token count; ECE = expected calibration error (%).",
        "",
        "| pairs | n | accuracy [95% CI] | length-balanced | chosen longer (n) | chosen shorter (n) | "
        "longer wins | corr(r, tokens) | ECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for category, cm in results.get("by_category", {}).items():
        lines.append(_summary_row(category, cm))
    lines += [_summary_row("all", m), ""]
    lines += [
        "## Accuracy (%) by rating level",
        "",
        "| " + " | ".join(RATING_LEVELS) + " | avg |",
        "|" + "---|" * (len(RATING_LEVELS) + 1),
        "| " + " | ".join(_fmt(m, f"rm/accuracy/{lvl}") for lvl in RATING_LEVELS) + f" | {_fmt(m, 'rm/accuracy')} |",
        "| " + " | ".join(_fmt(m, f"rm/count/{lvl}", scale=1.0) for lvl in RATING_LEVELS) + " | pairs |",
        "",
    ]
    sources = sorted(k[len("rm/accuracy/source/") :] for k in m if k.startswith("rm/accuracy/source/"))
    lines += [
        "## Accuracy (%) by source",
        "",
        "| | " + " | ".join(sources) + " |",
        "|---|" + "---|" * len(sources),
        "| accuracy | " + " | ".join(_fmt(m, f"rm/accuracy/source/{s}") for s in sources) + " |",
        "| length-balanced | " + " | ".join(_fmt(m, f"rm/balanced_accuracy/source/{s}") for s in sources) + " |",
        "| pairs | " + " | ".join(_fmt(m, f"rm/count/source/{s}", 1.0) for s in sources) + " |",
        "",
    ]
    qkeys = [f"rm/gap/q{round(q * 100):02d}" for q in QUANTILES]
    lines += [
        "## Reward gap r(chosen) - r(rejected)",
        "",
        "| mean | std | " + " | ".join(k[-3:] for k in qkeys) + " |",
        "|" + "---|" * (2 + len(qkeys)),
        "| " + " | ".join(f"{m[k]:.3f}" for k in ["rm/gap/mean", "rm/gap/std", *qkeys]) + " |",
        "",
    ]
    if "calibration" in results:
        cal = results["calibration"]
        lines += [
            f"## Calibration of P(chosen) = sigmoid(r_c - r_r) (ECE {cal['ece'] * 100:.1f}%)",
            "",
            "| bin | predictions | mean P | observed |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {_num(b['confidence'])} | {_num(b['observed'])} |"
            for b in cal["bins"]
        ]
        lines.append("")
    if "rm/unsafe_recall" in m or "rm/accuracy/rejected_unsafe" in m:
        lines += [
            "## Safety",
            "",
            "| unsafe recall (r < 0) | unsafe recall, rejected | accuracy, rejected unsafe |",
            "|---|---|---|",
            f"| {_fmt(m, 'rm/unsafe_recall')} | {_fmt(m, 'rm/unsafe_recall/rejected')} | "
            f"{_fmt(m, 'rm/accuracy/rejected_unsafe')} |",
            "",
        ]
    return "\n".join(lines)


def _save_png(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)


def write_eval(results: dict, out_dir: str | Path) -> Path:
    """Write ``eval.json`` (everything in ``results``), ``eval.md``, ``eval_gaps.png`` (the gap
    histogram) and ``eval_calibration.png`` (the reliability diagram) into out_dir."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "eval.json", results)
    write_text_atomic(out_dir / "eval.md", markdown_report(results))
    m = results["metrics"]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.hist(results["gaps"], bins=min(50, max(10, len(results["gaps"]) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Reward gap, accuracy {m['rm/accuracy'] * 100:.1f}% (n={results['n_pairs']})")
    fig.tight_layout()
    _save_png(fig, out_dir / "eval_gaps.png")
    if "calibration" in results:
        cal = results["calibration"]
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        full = [b for b in cal["bins"] if b["count"]]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        ax.plot(
            [b["confidence"] for b in full],
            [b["observed"] for b in full],
            marker="o",
            color="tab:blue",
            label="this RM",
        )
        ax.bar(
            [(b["lo"] + b["hi"]) / 2 for b in full],
            [b["count"] / (2 * results["n_pairs"]) for b in full],
            width=0.08,
            color="tab:grey",
            alpha=0.3,
            label="share of predictions",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("P(chosen) = sigmoid(r_c - r_r)")
        ax.set_ylabel("observed rate")
        ax.set_title(f"Calibration, ECE {cal['ece'] * 100:.1f}% (n={results['n_pairs']} pairs)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        _save_png(fig, out_dir / "eval_calibration.png")
    return out_dir
