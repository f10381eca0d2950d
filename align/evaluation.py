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

from align.errors import AlignError
from align.io import write_json_atomic, write_text_atomic


def policy_checkpoints(cfg, run_dir: Path, upto: str | None) -> list[tuple[str, Path]]:
    """[(name, model dir)]: the base model, then each finished policy stage (before `upto`)."""
    from align.config import POLICY_KINDS, STAGE_KINDS
    from align.models import resolve_model_dir

    out = [("base", resolve_model_dir(cfg.model))]
    wanted = cfg.eval.checkpoints if cfg.eval is not None and cfg.eval.checkpoints else None
    from align.pipeline import instances

    for name, stage, _ in instances(cfg):
        if name == upto:
            break
        if STAGE_KINDS[stage] in POLICY_KINDS and (wanted is None or stage in wanted):
            model = run_dir / name / "model"
            if not (run_dir / name / "manifest.json").is_file():
                raise AlignError(f"eval: stage '{name}' has not finished; run `align run` first")
            out.append((name, model))
    return out


def win_rate(scores, ref) -> float:
    """Share of prompts where `scores` beats `ref` (ties count half)."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, ref))
    return wins / max(len(ref), 1)


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
    import torch

    from align.models import load_causal_lm
    from align.refusal import agreement, is_refusal
    from reward.model import RewardScorer
    from rollout import SamplingParams, make_engine

    ecfg = cfg.eval
    seed = cfg.seed
    prompts = _load_prompts(cfg, ecfg.prompts, ecfg.num_prompts, seed)
    xs = _xstest(cfg, ecfg, seed)
    checkpoints = policy_checkpoints(cfg, run_dir, upto)
    names = [n for n, _ in checkpoints]
    if ecfg.reference not in names:
        raise AlignError(f"eval.reference={ecfg.reference!r} is not among the evaluated checkpoints {names}")
    sampling = SamplingParams(n=1, temperature=ecfg.sampling.temperature, top_p=ecfg.sampling.top_p,
                              max_new_tokens=ecfg.sampling.max_new_tokens, seed=seed)
    all_prompts = [p["prompt"] for p in prompts] + [x["prompt"] for x in xs]
    answers: dict[str, list[str]] = {}
    with make_engine(cfg.rollout, checkpoints[0][1], seed=seed, dtype=cfg.compute.dtype) as engine:
        for i, (name, path) in enumerate(checkpoints):
            if i > 0:
                engine.update_weights(load_causal_lm(path, "float32"))
            answers[name] = engine.generate(all_prompts, sampling).texts
            print(f"[align] eval: generated {len(all_prompts)} answers with {name}", flush=True)
    n = len(prompts)
    from align.pipeline import latest_dir

    h_dir, s_dir = rm_dirs or (latest_dir(cfg, run_dir, ecfg.reward.helpful_rm), latest_dir(cfg, run_dir, ecfg.reward.safety_rm))
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
        per[name] = {"helpful": h, "safety": s,
                     "refusal_unsafe": sum(unsafe) / len(unsafe) if unsafe else float("nan"),
                     "over_refusal_safe": sum(safe) / len(safe) if safe else float("nan"),
                     "length": sum(len(t) for t in texts) / max(n, 1)}
    ref = per[ecfg.reference]
    metrics: dict[str, float] = {}
    for name in names:
        p = per[name]
        metrics[f"eval/{name}/helpful_mean"] = sum(p["helpful"]) / n
        metrics[f"eval/{name}/safety_mean"] = sum(p["safety"]) / n
        metrics[f"eval/{name}/winrate_helpful_vs_{ecfg.reference}"] = win_rate(p["helpful"], ref["helpful"])
        metrics[f"eval/{name}/winrate_safety_vs_{ecfg.reference}"] = win_rate(p["safety"], ref["safety"])
        if xs:
            metrics[f"eval/{name}/xstest_refusal_unsafe"] = p["refusal_unsafe"]
            metrics[f"eval/{name}/xstest_over_refusal_safe"] = p["over_refusal_safe"]
        metrics[f"eval/{name}/answer_chars"] = p["length"]
    metrics.update(agreement())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "eval.json", {"metrics": metrics, "checkpoints": {k: str(v) for k, v in checkpoints},
                                              "scores": {k: {"helpful": v["helpful"], "safety": v["safety"]} for k, v in per.items()}})
    samples = [{"checkpoint": name, "prompt": (prompts + xs)[i]["prompt"], "source": (prompts + xs)[i]["source"],
                "answer": answers[name][i]} for name in names for i in range(len(all_prompts))]
    write_text_atomic(out_dir / "samples.jsonl", "".join(__import__("json").dumps(r) + "\n" for r in samples))
    write_text_atomic(out_dir / "eval.md", markdown_table(names, per, metrics, ecfg.reference, bool(xs), n, len(xs)))
    _plots(names, per, metrics, ecfg.reference, out_dir)
    return metrics


def markdown_table(names, per, metrics, reference, has_xs, n, n_xs) -> str:
    ag = metrics["refusal/detector_accuracy"]
    lines = [f"# Checkpoints on the same {n} held-out prompts" + (f" and {n_xs} XSTest prompts" if has_xs else ""), "",
             f"| checkpoint | helpful RM (mean σ) | safety RM (mean σ) | win vs {reference}, helpful | win vs {reference}, safety |"
             + (" XSTest unsafe refused | XSTest safe refused |" if has_xs else ""),
             "|---|---|---|---|---|" + ("---|---|" if has_xs else "")]
    for name in names:
        row = (f"| {name} | {metrics[f'eval/{name}/helpful_mean']:.3f} | {metrics[f'eval/{name}/safety_mean']:.3f} | "
               f"{metrics[f'eval/{name}/winrate_helpful_vs_{reference}']:.2f} | {metrics[f'eval/{name}/winrate_safety_vs_{reference}']:.2f} |")
        if has_xs:
            row += f" {per[name]['refusal_unsafe']:.2f} | {per[name]['over_refusal_safe']:.2f} |"
        lines.append(row)
    lines += ["", f"Refusals are detected by string patterns (align/refusal.py, as the XSTest authors did); on "
              f"{int(metrics['refusal/detector_examples'])} hand-checked responses the detector agrees with the hand "
              f"label {ag * 100:.0f}% of the time (precision {metrics['refusal/detector_precision']:.2f}, recall "
              f"{metrics['refusal/detector_recall']:.2f})."]
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
    ax.bar([x - 0.2 for x in xs], [metrics[f"eval/{n}/winrate_helpful_vs_{reference}"] for n in names], 0.4, label="helpful RM")
    ax.bar([x + 0.2 for x in xs], [metrics[f"eval/{n}/winrate_safety_vs_{reference}"] for n in names], 0.4, label="safety RM")
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"win rate vs {reference}")
    ax.set_title("Win rate by stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "eval_winrates.png", dpi=90)


def run_eval(ctx) -> dict:
    return evaluate_run(ctx.cfg, ctx.run_dir, ctx.out_dir, upto=ctx.name, rm_dirs=(
        ctx.stage_dir(ctx.stage_cfg.reward.helpful_rm), ctx.stage_dir(ctx.stage_cfg.reward.safety_rm)))
