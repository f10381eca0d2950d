"""Rejection-sampling fine-tuning stage (Llama 2 sec. 3.2.3).

Phases: setup (prompts, held-out split, sampler) -> `heldout_rewards` of the init policy -> `sample_rounds`: sample K
answers per prompt (rollout engine, `sampling` temperature), score them with both RMs (LOGIT(Rc),
before whitening: align/rejection/score.py), keep per prompt the best of this round and of the kept
answers of all earlier rounds (align/rejection/select.py) -> fine-tune the policy (`init`) on the
kept set with the SFT loss on answers only (align.sft.train_sft) -> `heldout_rewards` of the result ->
`write_artifacts`.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from align.chat import prompt_ids
from align.data.dedup import drop_duplicates, drop_overlap
from align.data.load import load_datasets
from align.errors import AlignError
from align.io import read_json, write_json_atomic, write_text_atomic
from align.launch import dist
from align.models import check_model_dir, load_tokenizer, resolve_model_dir
from align.rejection.sample import sample_and_score
from align.rejection.score import CombinedScorer
from align.rejection.select import best_of_n_curve, pool_round, scores_by_prompt
from align.sft import tokenize_conversations, train_sft
from align.stats import paired_change
from rollout import make_engine
from rollout.types import SamplingParams

if TYPE_CHECKING:
    from align.pipeline import StageContext


class _EngineSlot:
    """At most one rollout engine alive at a time (they share the CPU and its memory)."""

    def __init__(self, rollout_cfg, seed: int, dtype: str):
        self.cfg, self.seed, self.dtype = rollout_cfg, seed, dtype
        self.engine, self.model_dir = None, None

    def get(self, model_dir: Path):
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


@dataclass
class Rounds:
    """What the sampling rounds produced: the pooled kept set and every sample, per-round pools, best-of-N
    curves and metrics."""

    kept: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    pools: dict[int, list[dict]] = field(default_factory=dict)
    curves: dict[int, dict] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def heldout_rewards(ctx: StageContext, heldout, get_engine, scorer, draw, when: str) -> list[dict]:
    """The held-out prompts' samples and rewards for one policy; one fixed seed, so before and after see
    the same draw. ``when`` names the resume directory ("before"; "after" is never resumed: the model is
    retrained after a kill)."""
    if not heldout:
        return []
    state = ctx.work_dir / f"heldout_{when}"
    if when == "after":
        shutil.rmtree(state, ignore_errors=True)
    cfg = ctx.stage_cfg
    return sample_and_score(
        heldout, get_engine, scorer, draw, state, cfg.prompts_per_batch, 0, ctx.cfg.seed, desc=f"held-out ({when})"
    )


def sample_rounds(ctx: StageContext, prompts, sampler_dir: Path, engines, scorer, draw, logger) -> Rounds:
    """Rank 0's rounds: sample K answers per prompt, score them, pool the best per prompt over the rounds; with the
    policy as its own sampler, fine-tune between rounds so the next round samples from the latest model."""
    cfg = ctx.stage_cfg
    out, source = Rounds(), sampler_dir
    for r in range(1, cfg.rounds + 1):
        got = sample_and_score(
            prompts,
            lambda: engines.get(source),
            scorer,
            draw,
            ctx.work_dir / f"round{r}" / "samples",
            cfg.prompts_per_batch,
            r,
            ctx.cfg.seed,
            desc=f"round {r} sampling",
        )
        out.kept = pool_round(out.kept, got)
        if ctx.world_size > 1:
            write_json_atomic(kept_path(ctx, r), out.kept)  # the other ranks train on it
        out.samples.extend(got)
        out.pools[r] = out.kept
        curve = out.curves[r] = best_of_n_curve(scores_by_prompt(got))
        row = {
            f"rejection/round{r}/sample_reward": _mean(s["score"] for s in got),
            f"rejection/round{r}/kept_reward": _mean(s["score"] for s in out.kept),
            f"rejection/round{r}/kept_from_earlier": _mean(float(s["round"] < r) for s in out.kept),
            f"rejection/round{r}/finished_share": _mean(float(s["finish_reason"] == "stop") for s in got),
        }
        out.metrics.update(row)
        logger.log(row, r)
        for i, n in enumerate(curve["n"]):
            logger.log(
                {
                    f"rejection/round{r}/best_of_n/max": curve["max"][i],
                    f"rejection/round{r}/best_of_n/median": curve["median"][i],
                },
                n,
            )
        print(
            f"[align] {ctx.name}: round {r}: mean reward {row[f'rejection/round{r}/sample_reward']:.3f}, "
            f"best-of-{cfg.k} {curve['max'][-1]:.3f}, kept {row[f'rejection/round{r}/kept_reward']:.3f}",
            flush=True,
        )
        if r < cfg.rounds and not cfg.sampler:
            engines.close()  # free the CPU and memory for training
            source = _train_round(ctx, out.kept, r)
    return out


def write_artifacts(ctx: StageContext, rounds: Rounds, before: list, after: list, extra: dict) -> dict:
    """samples.jsonl, pool(_roundR).jsonl, heldout.jsonl, best_of_n.json/.png, report.md; returns the summary."""
    cfg, out = ctx.stage_cfg, ctx.out_dir
    _jsonl(out / "samples.jsonl", rounds.samples)
    _jsonl(out / "pool.jsonl", rounds.kept)
    if cfg.rounds > 1:
        for r, pool in rounds.pools.items():
            _jsonl(out / f"pool_round{r}.jsonl", pool)
    _jsonl(
        out / "heldout.jsonl", [{**s, "policy": "before"} for s in before] + [{**s, "policy": "after"} for s in after]
    )
    write_json_atomic(
        out / "best_of_n.json",
        {
            "k": cfg.k,
            "estimator": "exact expectation over N-subsets of the K samples of each prompt, mean over prompts",
            "rounds": rounds.curves,
        },
    )
    plot_best_of_n(rounds.curves, out / "best_of_n.png")
    reward_before, reward_after = _mean(s["score"] for s in before), _mean(s["score"] for s in after)
    summary = {
        "rejection/reward_before": reward_before,
        "rejection/reward_after": reward_after,
        "rejection/reward_gain": None if reward_before is None else reward_after - reward_before,
        **heldout_change(before, after, ctx.cfg.seed),
        "rejection/samples": len(rounds.samples),
        "rejection/kept": len(rounds.kept),
        **rounds.metrics,
        **{f"rejection/round{r}/best_of_n_max": c["max"] for r, c in rounds.curves.items()},
        **{f"rejection/round{r}/best_of_n_median": c["median"] for r, c in rounds.curves.items()},
        **extra,
    }
    write_text_atomic(out / "report.md", _report(summary, rounds.curves))
    return summary


def run_rejection(ctx: StageContext) -> dict:
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
    eval_draw = replace(draw, n=cfg.eval_samples)
    engines = _EngineSlot(ctx.cfg.rollout, seed, ctx.cfg.compute.dtype)
    scorer = _Lazy(lambda: CombinedScorer.from_run(ctx, cfg.reward))
    logger = ctx.logger()
    print(
        f"[align] {ctx.name}: {len(train_prompts)} prompts x K={cfg.k}, {cfg.rounds} round(s), "
        f"{len(heldout)} held out; sampler {sampler_dir}",
        flush=True,
    )
    try:
        before = heldout_rewards(ctx, heldout, lambda: engines.get(ctx.init_model_dir), scorer, eval_draw, "before")
        rounds = sample_rounds(ctx, train_prompts, sampler_dir, engines, scorer, draw, logger)
        engines.close()
        scorer.value = None  # the RMs are not needed while training
        train_summary = _train(ctx, rounds.kept)
        after = heldout_rewards(ctx, heldout, lambda: engines.get(ctx.out_dir / "model"), scorer, eval_draw, "after")
    finally:
        engines.close()
        logger.close()
    return write_artifacts(ctx, rounds, before, after, {**stats, **train_summary})
