"""Rejection-sampling fine-tuning stage (Llama 2 sec. 3.2.3).

setup (prompts, held-out split, sampler) -> held-out reward of the init policy -> rounds: sample K
answers per prompt (rollout engine, `sampling` temperature), score them with both RMs (LOGIT(Rc),
before whitening: align/rejection/score.py), keep per prompt the best of this round and of the kept
answers of all earlier rounds (align/rejection/select.py) -> fine-tune the policy (`init`) on the
kept set with the SFT loss on answers only (align.sft.train_sft) -> held-out reward of the result.

Rounds: round 1 samples from `sampler` ('' = the policy itself). With the policy as sampler, each
later round samples from the model fine-tuned at the end of the previous round (the recipe's "latest
model"); with a teacher (distillation), every round samples from the teacher. Every fine-tuning
starts from `init`, on the pooled kept set: the pool already carries the best of all rounds, and
fine-tuning a fine-tuned model again on mostly the same answers would count them twice.

Artifacts (runs/NAME/rejection_sampling/): model/ (the fine-tuned policy), samples.jsonl (every
sample of every round with round, score and both RM scores), pool.jsonl (the kept set trained on, one
per prompt; pool_roundR.jsonl per round when rounds > 1), heldout.jsonl, best_of_n.json/.png
(recipe figure 7), report.md. Resume: every round's sampling and scoring is checkpointed per batch
of prompts in the work directory (align/rejection/sample.py); intermediate rounds' models too.

Processes: with `train.num_processes > 1` the stage runs on every rank under `accelerate launch`. Rank 0
alone samples and scores (the engine in its own processes, `rollout.in_process: false`, as in PPO) and
writes each round's kept set to `.work/<stage>/roundR/kept.json`; the other ranks wait for that file
(`align.launch.dist.wait_for_file`), then every rank fine-tunes on it under ZeRO-3 (align.sft.train_sft).
The held-out reward after training, the artifacts and the summary are rank 0's.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

from align.errors import AlignError
from align.io import read_json, write_json_atomic, write_text_atomic
from align.launch import dist
from align.rejection.select import best_of_n_curve, pool_round, scores_by_prompt
from align.rejection.sample import sample_and_score


class _EngineSlot:
    """At most one rollout engine alive at a time (they share the CPU and its memory)."""

    def __init__(self, rollout_cfg, seed: int, dtype: str):
        self.cfg, self.seed, self.dtype = rollout_cfg, seed, dtype
        self.engine, self.model_dir = None, None

    def get(self, model_dir: Path):
        from rollout import make_engine

        if self.engine is not None and self.model_dir == Path(model_dir):
            return self.engine
        self.close()
        self.engine, self.model_dir = make_engine(self.cfg, model_dir, self.seed, dtype=self.dtype), Path(model_dir)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.model_dir = None, None


class _Lazy:
    """Builds a value on first call and returns the same one afterwards."""

    def __init__(self, build):
        self.build, self.value = build, None

    def __call__(self):
        if self.value is None:
            self.value = self.build()
        return self.value


def resolve_sampler(ctx) -> Path:
    """The model that samples: '' = the policy (init); 'base'; an earlier stage's model; a local dir."""
    from align.models import check_model_dir, resolve_model_dir

    sampler = ctx.stage_cfg.sampler
    if sampler == "":
        return Path(ctx.init_model_dir)
    if sampler == "base":
        return resolve_model_dir(ctx.cfg.model)
    if sampler in ctx.cfg.stages:
        model = ctx.stage_dir(sampler) / "model"
        if not model.is_dir():
            raise AlignError(
                f"rejection_sampling.sampler={sampler!r}: stage '{sampler}' has not finished (no {model}); run it first"
            )
        return model
    path = Path(sampler).expanduser()
    check_model_dir(path, "rejection_sampling.sampler")
    return path


def load_prompts(ctx, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Prompt records with ``prompt_id``, split into (train, held-out) by a seeded shuffle.

    Prompts that leave no room for ``max_new_tokens`` within ``rollout.max_model_len`` (counted with
    the policy's tokenizer) are dropped and counted, since the engine refuses them.
    """
    from align.chat import prompt_ids
    from align.data.dedup import drop_duplicates, drop_overlap
    from align.data.load import load_datasets

    cfg = ctx.stage_cfg
    data, reports = load_datasets(cfg.prompts, "prompt", Path(ctx.cfg.data_dir), ctx.cfg.data.bad_rows, ctx.cfg.seed)
    budget = ctx.cfg.rollout.max_model_len - cfg.sampling.max_new_tokens
    records, too_long = [], 0
    for rec in data:
        if len(prompt_ids(tokenizer, rec["prompt"])) > budget:
            too_long += 1
            continue
        records.append({"prompt": rec["prompt"], "safety": bool(rec["safety"]), "source": rec["source"]})
    dups = overlap = 0
    if ctx.cfg.data.dedup:  # the same prompt twice, in one file or across files: the first kept
        records, dups = drop_duplicates(records)
    random.Random(ctx.cfg.seed).shuffle(records)
    for i, rec in enumerate(records):
        rec["prompt_id"] = i
    heldout, train = records[: cfg.heldout_prompts], records[cfg.heldout_prompts :]
    if ctx.cfg.data.dedup:
        heldout, overlap = drop_overlap(heldout, train)
    if not train:
        raise AlignError(
            f"rejection_sampling: {len(records)} usable prompts, all held out (heldout_prompts="
            f"{cfg.heldout_prompts}, {too_long} too long for rollout.max_model_len="
            f"{ctx.cfg.rollout.max_model_len}): add prompts or lower heldout_prompts"
        )
    stats = {
        "data/prompts": len(train),
        "data/heldout_prompts": len(heldout),
        "data/prompts_too_long": too_long,
        "data/safety_prompts": sum(r["safety"] for r in train),
        "data/bad_rows_skipped": sum(sum(r.skipped.values()) for r in reports),
        "data/duplicates_dropped": dups,
        "data/heldout_overlap_dropped": overlap,
    }
    return train, heldout, stats


def kept_conversations(kept: list[dict]) -> list[dict]:
    """SFT records of the kept answers: the prompt's turns untrained, the answer trained."""
    return [
        {
            "messages": [
                *({"role": m["role"], "content": m["content"], "train": False} for m in s["prompt"]),
                {"role": "assistant", "content": s["response"], "train": True},
            ],
            "source": f"rejection_sampling:round{s['round']}",
        }
        for s in kept
    ]


def _train(ctx, kept: list[dict]) -> dict:
    """Fine-tune ``ctx.init_model_dir`` on the kept set (answer-only loss) -> ``ctx.out_dir/model``."""
    from align.models import load_tokenizer
    from align.sft import tokenize_conversations, train_sft

    cfg = ctx.stage_cfg
    dataset, stats = tokenize_conversations(
        load_tokenizer(ctx.init_model_dir), kept_conversations(kept), cfg.max_length
    )
    return {**stats, **train_sft(ctx, dataset, cfg.train, cfg.max_length, packing=True)}


def _train_round(ctx, kept: list[dict], round_: int) -> Path:
    """An intermediate round's model (the next round's sampler), kept in the work directory; every rank
    trains it."""
    work = ctx.work_dir / f"round{round_}" / "train"
    sub = replace(ctx, work_dir=work, out_dir=work / "out")
    done = work / "done.json"
    if not done.is_file():
        if ctx.is_main:
            shutil.rmtree(sub.out_dir, ignore_errors=True)
            sub.out_dir.mkdir(parents=True)
            if ctx.world_size > 1:  # train_sft reads the launch's ZeRO-3 config from its work directory
                shutil.copytree(ctx.work_dir / "launch", work / "launch", dirs_exist_ok=True)
        dist.barrier()
        summary = _train(sub, kept)
        if ctx.is_main:
            write_json_atomic(done, summary)
    return sub.out_dir / "model"


def kept_path(ctx, round_: int) -> Path:
    """Where rank 0 leaves round ``round_``'s kept set for the other ranks."""
    return ctx.work_dir / f"round{round_}" / "kept.json"


def _follow(ctx) -> dict:
    """A rank other than 0: train on each kept set rank 0 publishes, when rank 0 trains on it."""
    cfg = ctx.stage_cfg
    for r in range(1, cfg.rounds + 1):
        if r < cfg.rounds and cfg.sampler:
            continue  # a teacher samples every round: nothing is trained before the last
        dist.wait_for_file(kept_path(ctx, r))
        kept = read_json(kept_path(ctx, r))
        if r < cfg.rounds:
            _train_round(ctx, kept, r)
    _train(ctx, kept)
    return {}


def _mean(xs) -> float | None:
    xs = list(xs)
    return statistics.fmean(xs) if xs else None


def plot_best_of_n(curves: dict[int, dict], path: Path) -> None:
    """Recipe figure 7: max and median reward among N samples against N, one colour per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for r, c in curves.items():
        (line,) = ax.plot(c["n"], c["max"], marker="o", label=f"round {r}: max of N")
        ax.plot(
            c["n"], c["median"], marker="s", linestyle="--", color=line.get_color(), label=f"round {r}: median of N"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("N samples")
    ax.set_ylabel("combined reward, LOGIT(Rc)")
    ax.set_title("Best-of-N reward (rejection sampling)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def heldout_change(before: list[dict], after: list[dict], seed: int) -> dict:
    """The held-out reward's change, prompt by prompt (each prompt's mean over its samples), with its 95%
    paired-bootstrap interval."""
    from align.stats import paired_change

    def per_prompt(samples):
        scores: dict[int, list[float]] = {}
        for s in samples:
            scores.setdefault(int(s["prompt_id"]), []).append(s["score"])
        return {k: sum(v) / len(v) for k, v in scores.items()}

    b, a = per_prompt(before), per_prompt(after)
    ids = sorted(set(b) & set(a))
    if not ids:
        return {}
    c = paired_change([b[i] for i in ids], [a[i] for i in ids], seed=seed)
    return {
        "rejection/reward_gain_lo": c["lo"],
        "rejection/reward_gain_hi": c["hi"],
        "rejection/heldout_n": c["n"],
        "rejection/within_noise": c["within_noise"],
    }


def _report(summary: dict, curves: dict[int, dict]) -> str:
    before, after = summary["rejection/reward_before"], summary["rejection/reward_after"]
    held = f"before {before:.4f}, after {after:.4f}" if before is not None else "not measured (heldout_prompts: 0)"
    if "rejection/reward_gain_lo" in summary:
        held += (
            f"; change {summary['rejection/reward_gain']:+.4f} [{summary['rejection/reward_gain_lo']:+.4f}, "
            f"{summary['rejection/reward_gain_hi']:+.4f}] (n={summary['rejection/heldout_n']} prompts, paired "
            f"bootstrap 95%){', within noise' if summary['rejection/within_noise'] else ''}"
        )
    lines = [
        "# Rejection sampling",
        "",
        f"Mean combined reward (LOGIT(Rc)) on {summary['data/heldout_prompts']} held-out prompts: {held}.",
        "",
        "Best-of-N reward (exact expectation over N-subsets of the K samples, mean over prompts):",
        "",
        "| round | curve | " + " | ".join(f"N={n}" for n in next(iter(curves.values()))["n"]) + " |",
        "|---|---|" + "---|" * len(next(iter(curves.values()))["n"]),
    ]
    for r, c in curves.items():
        for kind in ("max", "median"):
            lines.append(f"| {r} | {kind} | " + " | ".join(f"{v:.4f}" for v in c[kind]) + " |")
    return "\n".join(lines) + "\n"


def run_rejection(ctx) -> dict:
    from align.models import load_tokenizer
    from rollout.types import SamplingParams

    from align.rejection.score import CombinedScorer

    cfg = ctx.stage_cfg
    seed = ctx.cfg.seed
    if ctx.world_size > 1:
        from align.launch import start_sampling_ranks

        start_sampling_ranks("rejection_sampling.train.num_processes", cfg.train.num_processes, ctx.cfg.rollout)
        if not ctx.is_main:
            return _follow(ctx)
    train_prompts, heldout, stats = load_prompts(ctx, load_tokenizer(ctx.init_model_dir))
    sampler_dir = resolve_sampler(ctx)
    draw = SamplingParams(
        n=cfg.k,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        max_new_tokens=cfg.sampling.max_new_tokens,
    )
    # Held-out prompts are scored on samples from one fixed seed, so before and after see the same draw.
    eval_draw = replace(draw, n=cfg.eval_samples)
    engines = _EngineSlot(ctx.cfg.rollout, seed, ctx.cfg.compute.dtype)
    scorer = _Lazy(lambda: CombinedScorer.from_run(ctx, cfg.reward))
    logger = ctx.logger()
    if ctx.is_main:
        print(
            f"[align] {ctx.name}: {len(train_prompts)} prompts x K={cfg.k}, {cfg.rounds} round(s), "
            f"{len(heldout)} held out; sampler {sampler_dir}",
            flush=True,
        )
    try:
        before = (
            sample_and_score(
                heldout,
                lambda: engines.get(ctx.init_model_dir),
                scorer,
                eval_draw,
                ctx.work_dir / "heldout_before",
                cfg.prompts_per_batch,
                0,
                seed,
                desc="held-out (before)",
            )
            if heldout
            else []
        )
        kept: list[dict] = []
        samples: list[dict] = []
        curves: dict[int, dict] = {}
        pools: dict[int, list[dict]] = {}
        per_round: dict[str, float] = {}
        source = sampler_dir
        for r in range(1, cfg.rounds + 1):
            got = sample_and_score(
                train_prompts,
                lambda: engines.get(source),
                scorer,
                draw,
                ctx.work_dir / f"round{r}" / "samples",
                cfg.prompts_per_batch,
                r,
                seed,
                desc=f"round {r} sampling",
            )
            kept = pool_round(kept, got)
            if ctx.world_size > 1:
                write_json_atomic(kept_path(ctx, r), kept)  # the other ranks train on it
            samples.extend(got)
            pools[r] = kept
            curves[r] = best_of_n_curve(scores_by_prompt(got))
            row = {
                f"rejection/round{r}/sample_reward": _mean(s["score"] for s in got),
                f"rejection/round{r}/kept_reward": _mean(s["score"] for s in kept),
                f"rejection/round{r}/kept_from_earlier": _mean(float(s["round"] < r) for s in kept),
                f"rejection/round{r}/finished_share": _mean(float(s["finish_reason"] == "stop") for s in got),
            }
            per_round.update(row)
            logger.log(row, r)
            for i, n in enumerate(curves[r]["n"]):
                logger.log(
                    {
                        f"rejection/round{r}/best_of_n/max": curves[r]["max"][i],
                        f"rejection/round{r}/best_of_n/median": curves[r]["median"][i],
                    },
                    n,
                )
            if ctx.is_main:
                c = curves[r]
                print(
                    f"[align] {ctx.name}: round {r}: mean reward {row[f'rejection/round{r}/sample_reward']:.3f}, "
                    f"best-of-{cfg.k} {c['max'][-1]:.3f}, kept {row[f'rejection/round{r}/kept_reward']:.3f}",
                    flush=True,
                )
            if r < cfg.rounds and not cfg.sampler:
                engines.close()  # free the CPU and memory for training
                source = _train_round(ctx, kept, r)
        engines.close()
        scorer.value = None  # the RMs are not needed while training
        train_summary = _train(ctx, kept)
        after_dir = ctx.work_dir / "heldout_after"  # never resumed: the model is retrained after a kill
        shutil.rmtree(after_dir, ignore_errors=True)
        after = (
            sample_and_score(
                heldout,
                lambda: engines.get(ctx.out_dir / "model"),
                scorer,
                eval_draw,
                after_dir,
                cfg.prompts_per_batch,
                0,
                seed,
                desc="held-out (after)",
            )
            if heldout
            else []
        )
    finally:
        engines.close()
        logger.close()

    out = ctx.out_dir
    _jsonl(out / "samples.jsonl", samples)
    _jsonl(out / "pool.jsonl", kept)
    if cfg.rounds > 1:
        for r, pool in pools.items():
            _jsonl(out / f"pool_round{r}.jsonl", pool)
    _jsonl(
        out / "heldout.jsonl", [{**s, "policy": "before"} for s in before] + [{**s, "policy": "after"} for s in after]
    )
    write_json_atomic(
        out / "best_of_n.json",
        {
            "k": cfg.k,
            "estimator": "exact expectation over N-subsets of the K samples of each prompt, mean over prompts",
            "rounds": curves,
        },
    )
    plot_best_of_n(curves, out / "best_of_n.png")
    reward_before, reward_after = _mean(s["score"] for s in before), _mean(s["score"] for s in after)
    summary = {
        "rejection/reward_before": reward_before,
        "rejection/reward_after": reward_after,
        "rejection/reward_gain": None if reward_before is None else reward_after - reward_before,
        **heldout_change(before, after, seed),
        "rejection/samples": len(samples),
        "rejection/kept": len(kept),
        **stats,
        **per_round,
        **{f"rejection/round{r}/best_of_n_max": c["max"] for r, c in curves.items()},
        **{f"rejection/round{r}/best_of_n_median": c["median"] for r, c in curves.items()},
        **train_summary,
    }
    write_text_atomic(out / "report.md", _report(summary, curves))
    return summary
