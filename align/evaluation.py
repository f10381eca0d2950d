"""The `eval` stage and `align eval RUN_DIR`: every policy checkpoint of a run on the same prompts.

For the base model and each policy stage (sft, rejection sampling, PPO, GAtt): generate answers to
held-out prompts and XSTest prompts with one rollout engine (weights swapped per checkpoint), score
them with both reward models, and report mean scores, score distributions, the win rate against the
reference checkpoint by each RM (the recipe's way of tracking progress between iterations), and
XSTest refusal rates (refused `unsafe` prompts should be high, refused `safe` prompts low) by the
pattern detector of `align.refusal`, whose agreement with hand labels is reported beside them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import AlignError
from align.io import write_json_atomic, write_text_atomic
from align.models import load_causal_lm, resolve_model_dir
from align.refusal import agreement, is_refusal
from align.stats import bootstrap_mean, bootstrap_stat, length_controlled_win_rate, wilson, win_outcomes
from rollout import SamplingParams, make_engine

if TYPE_CHECKING:
    from align.pipeline import StageContext
from align.rundir import instances, latest_dir
from align.stages import STAGES


def policy_checkpoints(cfg, run_dir: Path, upto: str | None) -> list[tuple[str, Path]]:
    """[(name, model dir)]: the base model, then each finished policy stage (before `upto`)."""
    out = [("base", resolve_model_dir(cfg.model))]
    wanted = cfg.eval.checkpoints if cfg.eval is not None and cfg.eval.checkpoints else None
    for name, stage, _ in instances(cfg):
        if name == upto:
            break
        if STAGES[stage].policy and (wanted is None or stage in wanted):
            model = run_dir / name / "model"
            if not (run_dir / name / "manifest.json").is_file():
                raise AlignError(f"eval: stage '{name}' has not finished; run `align run` first")
            out.append((name, model))
    return out


def win_rate(scores, ref) -> float:
    """Share of prompts where `scores` beats `ref` (ties count half)."""
    outcomes = win_outcomes(scores, ref)
    return sum(outcomes) / max(len(outcomes), 1)


def compare(scores, ref, lengths, ref_lengths, seed: int) -> dict:
    """One checkpoint against the reference under one RM: the raw and the length-controlled win rate
    (`align.stats.length_controlled_win_rate`, lengths in characters), each with a 95% bootstrap interval
    over prompts, and the mean score with its interval."""
    outcomes = win_outcomes(scores, ref)
    diffs = [a - b for a, b in zip(lengths, ref_lengths)]
    win, win_lo, win_hi = bootstrap_mean(outcomes, seed=seed)
    lc = length_controlled_win_rate(outcomes, diffs)
    lc_lo, lc_hi = bootstrap_stat(
        len(outcomes),
        lambda idx: length_controlled_win_rate([outcomes[i] for i in idx], [diffs[i] for i in idx]),
        n_boot=300,
        seed=seed,
    )
    mean, mean_lo, mean_hi = bootstrap_mean(list(scores), seed=seed)
    return {
        "win": win,
        "win_lo": win_lo,
        "win_hi": win_hi,
        "lc_win": lc,
        "lc_win_lo": lc_lo,
        "lc_win_hi": lc_hi,
        "mean": mean,
        "mean_lo": mean_lo,
        "mean_hi": mean_hi,
    }


def _load_prompts(cfg, specs, n: int, seed: int) -> list[dict]:
    from align.data.load import load_datasets

    if not specs:
        return []
    ds, _ = load_datasets(specs, "prompt", Path(cfg.data_dir), cfg.data.bad_rows, seed)
    rows = ds.to_list()
    rng = random.Random(seed)
    return rng.sample(rows, min(n, len(rows)))


def _xstest(cfg, ecfg, seed: int) -> list[dict]:
    from align.data.load import load_datasets

    if not ecfg.xstest:
        return []
    rows = load_datasets(ecfg.xstest, "prompt", Path(cfg.data_dir), cfg.data.bad_rows, seed)[0].to_list()
    rng = random.Random(seed)
    out = []
    for label in ("xstest:safe", "xstest:unsafe"):
        group = [r for r in rows if r["source"] == label]
        out += rng.sample(group, min(ecfg.xstest_per_label, len(group)))
    return out


def evaluate_run(cfg, run_dir: Path, out_dir: Path, upto: str | None = None, rm_dirs=None) -> dict:
    # torch (reward.model imports it): deferred, so that the CLI imports this module without it.
    import torch

    from reward.model import RewardScorer

    ecfg = cfg.eval
    seed = cfg.seed
    prompts = _load_prompts(cfg, ecfg.prompts, ecfg.num_prompts, seed)
    xs = _xstest(cfg, ecfg, seed)
    checkpoints = policy_checkpoints(cfg, run_dir, upto)
    names = [n for n, _ in checkpoints]
    if ecfg.reference not in names:
        raise AlignError(f"eval.reference={ecfg.reference!r} is not among the evaluated checkpoints {names}")
    sampling = SamplingParams(
        n=1,
        temperature=ecfg.sampling.temperature,
        top_p=ecfg.sampling.top_p,
        max_new_tokens=ecfg.sampling.max_new_tokens,
        seed=seed,
    )
    all_prompts = [p["prompt"] for p in prompts] + [x["prompt"] for x in xs]
    answers: dict[str, list[str]] = {}
    with make_engine(cfg.rollout, checkpoints[0][1], seed=seed, dtype=cfg.compute.dtype) as engine:
        for i, (name, path) in enumerate(checkpoints):
            if i > 0:
                engine.update_weights(load_causal_lm(path, "float32"))
            answers[name] = engine.generate(all_prompts, sampling).texts
            print(f"[align] eval: generated {len(all_prompts)} answers with {name}", flush=True)
    n = len(prompts)
    h_dir, s_dir = rm_dirs or (
        latest_dir(cfg, run_dir, ecfg.reward.helpful_rm),
        latest_dir(cfg, run_dir, ecfg.reward.safety_rm),
    )
    helpful = RewardScorer.from_pretrained(h_dir / "model")  # each with the settings it trained with (scorer.json)
    safety = RewardScorer.from_pretrained(s_dir / "model")
    per: dict[str, dict] = {}
    for name in names:
        texts = answers[name][:n]
        h = torch.sigmoid(helpful.score([p["prompt"] for p in prompts], texts)).tolist()
        s = torch.sigmoid(safety.score([p["prompt"] for p in prompts], texts)).tolist()
        xs_text = answers[name][n:]
        refused = [is_refusal(t) for t in xs_text]
        unsafe = [r for r, x in zip(refused, xs) if x["source"] == "xstest:unsafe"]
        safe = [r for r, x in zip(refused, xs) if x["source"] == "xstest:safe"]
        per[name] = {
            "helpful": h,
            "safety": s,
            "refused_unsafe": unsafe,
            "refused_safe": safe,
            "lengths": [len(t) for t in texts],
        }
    ref = per[ecfg.reference]
    metrics: dict[str, float] = {"eval/n_prompts": n, "eval/n_xstest": len(xs)}
    for name in names:
        p = per[name]
        for rm in ("helpful", "safety"):
            c = compare(p[rm], ref[rm], p["lengths"], ref["lengths"], seed)
            vs = f"vs_{ecfg.reference}"
            metrics.update(
                {
                    f"eval/{name}/{rm}_mean": c["mean"],
                    f"eval/{name}/{rm}_mean_lo": c["mean_lo"],
                    f"eval/{name}/{rm}_mean_hi": c["mean_hi"],
                    f"eval/{name}/winrate_{rm}_{vs}": c["win"],
                    f"eval/{name}/winrate_{rm}_{vs}_lo": c["win_lo"],
                    f"eval/{name}/winrate_{rm}_{vs}_hi": c["win_hi"],
                    f"eval/{name}/lc_winrate_{rm}_{vs}": c["lc_win"],
                    f"eval/{name}/lc_winrate_{rm}_{vs}_lo": c["lc_win_lo"],
                    f"eval/{name}/lc_winrate_{rm}_{vs}_hi": c["lc_win_hi"],
                }
            )
        if xs:
            for key, hits in (
                ("xstest_refusal_unsafe", p["refused_unsafe"]),
                ("xstest_over_refusal_safe", p["refused_safe"]),
            ):
                lo, hi = wilson(sum(hits), len(hits))
                metrics.update(
                    {
                        f"eval/{name}/{key}": sum(hits) / len(hits) if hits else float("nan"),
                        f"eval/{name}/{key}_lo": lo,
                        f"eval/{name}/{key}_hi": hi,
                    }
                )
        metrics[f"eval/{name}/answer_chars"] = sum(p["lengths"]) / max(n, 1)
    metrics.update(agreement())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out_dir / "eval.json",
        {
            "metrics": metrics,
            "checkpoints": {k: str(v) for k, v in checkpoints},
            "scores": {k: {"helpful": v["helpful"], "safety": v["safety"]} for k, v in per.items()},
        },
    )
    samples = [
        {
            "checkpoint": name,
            "prompt": (prompts + xs)[i]["prompt"],
            "source": (prompts + xs)[i]["source"],
            "answer": answers[name][i],
        }
        for name in names
        for i in range(len(all_prompts))
    ]
    write_text_atomic(out_dir / "samples.jsonl", "".join(__import__("json").dumps(r) + "\n" for r in samples))
    write_text_atomic(out_dir / "eval.md", markdown_table(names, per, metrics, ecfg.reference, bool(xs), n, len(xs)))
    _plots(names, per, metrics, ecfg.reference, out_dir)
    return metrics


def markdown_table(names, per, metrics, reference, has_xs, n, n_xs) -> str:
    """Each checkpoint's mean RM scores and win rates against `reference`, raw and length-controlled, each
    with its 95% interval; XSTest refusal rates with Wilson intervals."""

    def cell(key: str, pct: bool = True) -> str:
        v, lo, hi = metrics[key], metrics[key + "_lo"], metrics[key + "_hi"]
        return f"{v * 100:.0f}% [{lo * 100:.0f}, {hi * 100:.0f}]" if pct else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    ag = metrics["refusal/detector_accuracy"]
    vs = f"vs_{reference}"
    lines = [
        f"# Checkpoints on the same {n} held-out prompts" + (f" and {n_xs} XSTest prompts" if has_xs else ""),
        "",
        f"Every figure with its 95% interval (bootstrap over the {n} prompts; Wilson for XSTest rates). "
        f"Win rates are against {reference} (ties count half); length-controlled (LC) win rates are read off a "
        "logistic regression of the outcome on the answer-length difference at equal length (AlpacaEval 2.0's "
        "control), so a checkpoint that only wrote more does not look better.",
        "",
        f"| checkpoint | helpful RM (mean σ) | safety RM (mean σ) | win vs {reference}, helpful | LC win, helpful "
        f"| win vs {reference}, safety | LC win, safety | answer chars |"
        + (" XSTest unsafe refused | XSTest safe refused |" if has_xs else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_xs else ""),
    ]
    for name in names:
        row = (
            f"| {name} | {cell(f'eval/{name}/helpful_mean', False)} | {cell(f'eval/{name}/safety_mean', False)} | "
            f"{cell(f'eval/{name}/winrate_helpful_{vs}')} | {cell(f'eval/{name}/lc_winrate_helpful_{vs}')} | "
            f"{cell(f'eval/{name}/winrate_safety_{vs}')} | {cell(f'eval/{name}/lc_winrate_safety_{vs}')} | "
            f"{metrics[f'eval/{name}/answer_chars']:.0f} |"
        )
        if has_xs:
            row += f" {cell(f'eval/{name}/xstest_refusal_unsafe')} | {cell(f'eval/{name}/xstest_over_refusal_safe')} |"
        lines.append(row)
    lines += [
        "",
        f"Refusals are detected by string patterns (align/refusal.py, as the XSTest authors did); on "
        f"{int(metrics['refusal/detector_examples'])} hand-checked responses the detector agrees with the hand "
        f"label {ag * 100:.0f}% of the time (precision {metrics['refusal/detector_precision']:.2f}, recall "
        f"{metrics['refusal/detector_recall']:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def _plots(names, per, metrics, reference, out_dir: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for name in names:
        ax.hist(per[name]["helpful"], bins=20, range=(0, 1), histtype="step", label=name)
    ax.set_xlabel("helpfulness RM score (sigmoid)")
    ax.set_ylabel("prompts")
    ax.set_title("Helpfulness score by checkpoint")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "eval_scores.png", dpi=90)
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [metrics[f"eval/{n}/winrate_helpful_vs_{reference}"] for n in names],
        0.4,
        label="helpful RM",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [metrics[f"eval/{n}/winrate_safety_vs_{reference}"] for n in names],
        0.4,
        label="safety RM",
    )
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"win rate vs {reference}")
    ax.set_title("Win rate by stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "eval_winrates.png", dpi=90)


def run_eval(ctx: StageContext) -> dict:
    return evaluate_run(
        ctx.cfg,
        ctx.run_dir,
        ctx.out_dir,
        upto=ctx.name,
        rm_dirs=(ctx.stage_dir(ctx.stage_cfg.reward.helpful_rm), ctx.stage_dir(ctx.stage_cfg.reward.safety_rm)),
    )
