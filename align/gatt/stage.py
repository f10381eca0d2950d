"""Ghost Attention stage (Llama 2 sec. 3.3).

Phases: `build_dialogues` (instruction bank, dialogues split into training and held-out) -> `sample`
(rank 0: recall of the init policy with the instruction in the first turn only, align/gatt/evaluate.py;
then the training dialogues answered with the instruction on every user turn, best of `best_of` by the
checker, align/gatt/build.py) -> `training_set` (the instruction kept in the first user turn only, plus
`reference_samples` made by program from the data's own answers; the answers trained by `train_turns`)
-> align.sft.train_sft -> `evaluate_after` -> `write_artifacts`.

Artifacts (runs/NAME/gatt/): model/, eval.json and eval.md (Table 30 layout, before and after),
dialogues.jsonl (the sampled training dialogues), reference.jsonl (the program-made training samples,
conversation records), eval_dialogues.jsonl (the held-out dialogues as answered before and after,
`eval_repeats` times each, with its own instruction draw). Resume: the evaluation of the init policy
and the sampled dialogues are saved in the work directory once done; training resumes from its
checkpoints.

Processes: with `train.num_processes > 1` the stage runs on every rank under `accelerate launch`. Rank 0
alone runs the engine (in its own processes, `rollout.in_process: false`, as in PPO): the evaluation
before and the sampling, saved to the work directory; the other ranks wait for the sampled dialogues
(`align.launch.dist.wait_for_file`), build the same training set (every draw is seeded) and every rank
fine-tunes under ZeRO-3 (align.sft.train_sft). The evaluation after, the artifacts and the summary are
rank 0's.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from align.chat import prompt_ids
from align.data.dedup import drop_duplicates, drop_overlap
from align.data.importers import FORMAT_KINDS
from align.data.load import load_records
from align.errors import AlignError
from align.gatt.build import (
    answered_turns,
    make_dialogues,
    reference_records,
    roll_dialogues,
    trained_answers,
    training_records,
    user_turns,
)
from align.gatt.evaluate import markdown_table, recall_by_turn
from align.gatt.instructions import InstructionBank
from align.io import read_json, write_json_atomic, write_text_atomic
from align.launch import dist
from align.models import load_tokenizer
from align.sft import tokenize_conversations, train_sft
from align.stats import wilson
from rollout import make_engine
from rollout.types import SamplingParams

if TYPE_CHECKING:
    from align.pipeline import StageContext


def load_user_sequences(ctx) -> tuple[list[tuple[list[str], list[tuple[str, str]]]], dict]:
    """Per record of every listed dataset: its user turns (of conversations where the format has them,
    of prompts otherwise) and its answered (user, assistant) turns (none for prompts)."""
    seqs, counts = [], {}
    for spec in ctx.stage_cfg.dialogues:
        kinds = FORMAT_KINDS[spec.format]
        kind = "conversation" if "conversation" in kinds else "prompt" if "prompt" in kinds else None
        if kind is None:
            raise AlignError(f"gatt.dialogues: format {spec.format!r} gives neither conversations nor prompts")
        records, _ = load_records(spec, kind, Path(ctx.cfg.data_dir), ctx.cfg.data.bad_rows, ctx.cfg.seed)
        got = [(u, answered_turns(r, kind)) for r in records if (u := user_turns(r, kind))]
        counts[f"data/{spec.format}_dialogues"] = counts.get(f"data/{spec.format}_dialogues", 0) + len(got)
        seqs.extend(got)
    counts["data/duplicates_dropped"] = 0
    if ctx.cfg.data.dedup:  # the same turns twice, in one dataset or across datasets, are one dialogue
        seqs, counts["data/duplicates_dropped"] = drop_duplicates(seqs, key=json.dumps)
    return seqs, counts


def split_dialogues(loaded: list, n_eval: int, seed: int, dedup: bool = True) -> tuple[list, list, int]:
    """(held-out user-turn sequences, training entries, how many held-out ones were dropped): ``n_eval`` of
    the loaded (users, answered) entries held out by ``seed``; with ``dedup``, less those whose opening user
    turn (where the instruction goes) also opens a training entry."""
    loaded = list(loaded)
    random.Random(f"{seed}/gatt/split").shuffle(loaded)
    held, train, overlap = loaded[:n_eval], loaded[n_eval:], 0
    if dedup:
        held, overlap = drop_overlap(held, train, key=lambda entry: entry[0][0])
    return [users for users, _ in held], train, overlap


def _fits(tokenizer, max_model_len: int, max_new_tokens: int):
    return lambda chat: len(prompt_ids(tokenizer, chat)) + max_new_tokens <= max_model_len


def _sampling(cfg, max_new_tokens: int = 0):
    return SamplingParams(
        n=1,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        max_new_tokens=max_new_tokens or cfg.sampling.max_new_tokens,
    )


def _evaluate(engine, dialogues, instructions, ctx, tokenizer, label: str) -> tuple[list[list[str]], dict]:
    """Recall of the engine's policy on the held-out dialogues, with the evaluation's answer budget."""
    cfg = ctx.stage_cfg
    sampling = _sampling(cfg, cfg.eval_max_new_tokens)
    # The same seed before and after GAtt: both policies answer the same held-out draw.
    answers, stats = roll_dialogues(
        engine.generate,
        dialogues,
        instructions,
        sampling,
        every_turn=False,
        best_of=1,
        seed=ctx.cfg.seed + 1,
        fits=_fits(tokenizer, ctx.cfg.rollout.max_model_len, sampling.max_new_tokens),
        desc=f"recall ({label})",
    )
    return answers, recall_by_turn(instructions, answers, max(cfg.eval_turns))


def evaluation_draws(bank, dialogues: list[list[str]], repeats: int, seed: int) -> tuple[list[list[str]], list]:
    """The held-out dialogues ``repeats`` times over, each time with its own draw of single checkable
    instructions (`InstructionBank.evaluation_set`; the first draw is the same whatever ``repeats``).
    The engine seeds every prompt of a call by its index, so a repeated dialogue also gets its own
    answers, even under an instruction without a value (capitals)."""
    out_d, out_i = [], []
    for r in range(repeats if dialogues else 0):
        rng = random.Random(f"{seed}/gatt/eval_instructions" + (f"/{r}" if r else ""))
        out_d += dialogues
        out_i += bank.evaluation_set(len(dialogues), rng)
    return out_d, out_i


def _keyed(d: dict) -> dict:
    """JSON turns its int keys into strings; turn them back."""
    return {int(k) if str(k).isdigit() else k: (_keyed(v) if isinstance(v, dict) else v) for k, v in d.items()}


@dataclass
class GattData:
    """What the stage samples, trains on and evaluates, all drawn from the seed."""

    bank: InstructionBank
    ref_kinds: tuple[str, ...]  # the checkable kinds the reference samples teach
    train_loaded: list  # (user turns, answered (user, answer) pairs) of the training dialogue data
    train_dialogues: list[list[str]]
    train_insts: list
    held_out: list[list[str]]  # one held-out dialogue per held-out sequence
    eval_dialogues: list[list[str]]  # held_out, eval_repeats times over
    eval_insts: list
    stats: dict


def build_dialogues(ctx: StageContext) -> GattData:
    """Phase 1: the instruction bank, the dialogue data split into training and held-out, the training
    dialogues with their instructions, and the held-out ones with their evaluation draws."""
    cfg, seed = ctx.stage_cfg, ctx.cfg.seed
    bank = InstructionBank.load(cfg.instructions)
    ref_kinds = bank.checkable_names(cfg.reference_kinds, "gatt.reference_kinds")  # refused before any sampling
    loaded, stats = load_user_sequences(ctx)
    eval_seqs, train_loaded, stats["data/heldout_overlap_dropped"] = split_dialogues(
        loaded, cfg.eval_dialogues, seed, ctx.cfg.data.dedup
    )
    train_seqs = [users for users, _ in train_loaded]
    if not train_seqs:
        raise AlignError(
            f"gatt: {len(loaded)} dialogues, all held out for evaluation (eval_dialogues="
            f"{cfg.eval_dialogues}): add dialogue data or lower eval_dialogues"
        )
    train_dialogues = make_dialogues(train_seqs, cfg.num_dialogues, cfg.turns, random.Random(f"{seed}/gatt/train"))
    irng = random.Random(f"{seed}/gatt/instructions")
    train_insts = [bank.sample(irng, cfg.shorten_prob) for _ in train_dialogues]
    max_turn = max(cfg.eval_turns)
    held_out = (
        make_dialogues(eval_seqs, len(eval_seqs), max_turn, random.Random(f"{seed}/gatt/eval")) if eval_seqs else []
    )
    eval_dialogues, eval_insts = evaluation_draws(bank, held_out, cfg.eval_repeats, seed)
    return GattData(
        bank, ref_kinds, train_loaded, train_dialogues, train_insts, held_out, eval_dialogues, eval_insts, stats
    )


def sample(ctx: StageContext, data: GattData, tokenizer, before_file: Path, sampled_file: Path) -> None:
    """Phase 2 (rank 0): the init policy's recall on the held-out dialogues, then the training dialogues
    answered turn by turn with the instruction on every turn; each saved once done (a rerun skips it)."""
    cfg, seed = ctx.stage_cfg, ctx.cfg.seed
    sampling = _sampling(cfg)
    engine = None
    try:
        if data.eval_dialogues and not before_file.is_file():
            engine = make_engine(ctx.cfg.rollout, ctx.init_model_dir, seed, dtype=ctx.cfg.compute.dtype)
            answers, recall = _evaluate(engine, data.eval_dialogues, data.eval_insts, ctx, tokenizer, "before")
            write_json_atomic(before_file, {"answers": answers, "recall": recall})
        if not sampled_file.is_file():
            engine = engine or make_engine(ctx.cfg.rollout, ctx.init_model_dir, seed, dtype=ctx.cfg.compute.dtype)
            answers, stats = roll_dialogues(
                engine.generate,
                data.train_dialogues,
                data.train_insts,
                sampling,
                every_turn=True,
                best_of=cfg.best_of,
                seed=seed,
                fits=_fits(tokenizer, ctx.cfg.rollout.max_model_len, sampling.max_new_tokens),
                do_repair=cfg.repair,
                desc="sampling",
            )
            write_json_atomic(sampled_file, {"answers": answers, "stats": stats})
    finally:
        if engine is not None:
            engine.close()


def training_set(ctx: StageContext, data: GattData, sampled: dict) -> tuple[list[dict], list[dict], dict]:
    """Phase 3: GAtt's samples of the sampled dialogues (the instruction in turn 1 only) plus the
    reference samples made by program from the training dialogues' own answers (never the held-out
    ones). Returns (every record, the reference records, counts)."""
    cfg, seed = ctx.stage_cfg, ctx.cfg.seed
    records = []
    for users, answers, inst in zip(data.train_dialogues, sampled["answers"], data.train_insts):
        records += training_records(users[: len(answers)], answers, inst, cfg.train_turns)
    n_sampled = sum(trained_answers(r) for r in records)
    rrng = random.Random(f"{seed}/gatt/reference")
    try:
        reference, ref_stats = reference_records(
            [pairs for _, pairs in data.train_loaded if pairs],
            cfg.reference_samples,
            cfg.turns,
            lambda: data.bank.sample(rrng, cfg.shorten_prob, only=data.ref_kinds, max_parts=cfg.reference_max_parts),
            cfg.train_turns,
            rrng,
            cfg.reference_answer_chars,
        )
    except ValueError as e:
        raise AlignError(str(e)) from None
    records += reference
    if not records:
        raise AlignError(
            "gatt: no sampled answer keeps its instruction, so there is nothing to train on: raise "
            "best_of, set repair: true, or use an instruction bank the policy can follow"
        )
    counts = {
        "gatt/data/samples": n_sampled + ref_stats["answers"],
        "gatt/data/sequences": len(records),
        "gatt/data/sampled_samples": n_sampled,
        "gatt/data/reference_samples": ref_stats["answers"],
        "gatt/data/reference_turns_cut": ref_stats["cut"],
        "gatt/data/reference_conversations": ref_stats["conversations"],
    }
    return records, reference, counts


def evaluate_after(ctx: StageContext, data: GattData, tokenizer) -> dict:
    """Phase 5 (rank 0): the fine-tuned policy's recall on the same held-out draws as before."""
    engine = make_engine(ctx.cfg.rollout, ctx.out_dir / "model", ctx.cfg.seed, dtype=ctx.cfg.compute.dtype)
    try:
        answers, recall = _evaluate(engine, data.eval_dialogues, data.eval_insts, ctx, tokenizer, "after")
    finally:
        engine.close()
    return {"answers": answers, "recall": recall}


def recall_summary(before: dict, after: dict, turns) -> dict:
    """The recall before and after at each evaluated turn, with its Wilson interval and n, and per kind."""
    summary: dict = {}
    for name, rec in (("before", before), ("after", after)):
        for t in turns:
            cell = rec["overall"][t]
            summary[f"gatt/recall_{name}/turn{t}"] = cell["recall"]
            if cell["recall"] is not None:
                lo, hi = wilson(min(cell["n"], cell["recall"] * cell["n"]), cell["n"])
                summary.update(
                    {
                        f"gatt/recall_{name}/turn{t}_lo": lo,
                        f"gatt/recall_{name}/turn{t}_hi": hi,
                        f"gatt/recall_{name}/turn{t}_n": cell["n"],
                    }
                )
    for name, rec in (("before", before), ("after", after)):
        for kind, table in rec["by_kind"].items():
            for t in turns:
                summary[f"gatt/recall_{name}/turn{t}/{kind}"] = table[t]["recall"]
    return summary


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_artifacts(ctx: StageContext, data: GattData, sampled: dict, reference: list, before, after) -> None:
    """Phase 6 (rank 0): dialogues.jsonl, reference.jsonl and, with an evaluation, eval.json, eval.md
    and eval_dialogues.jsonl."""
    cfg, out = ctx.stage_cfg, ctx.out_dir
    rows = zip(data.train_dialogues, sampled["answers"], data.train_insts)
    write_text_atomic(
        out / "dialogues.jsonl",
        _jsonl(
            {"users": u[: len(a)], "answers": a, "instruction": i.to_dict(), "kept": [i.keeps(x) for x in a]}
            for u, a, i in rows
        ),
    )
    write_text_atomic(out / "reference.jsonl", _jsonl(reference))
    if after is None:
        return
    write_json_atomic(
        out / "eval.json",
        {
            "turns": list(cfg.eval_turns),
            "before": before["recall"],
            "after": after["recall"],
            "n_dialogues": len(data.held_out),
            "repeats": cfg.eval_repeats,
            "instructions": [i.to_dict() for i in data.eval_insts],
        },
    )
    write_text_atomic(out / "eval.md", markdown_table(before["recall"], after["recall"], cfg.eval_turns))
    n = len(data.held_out)
    rows = zip(data.eval_dialogues, data.eval_insts, before["answers"], after["answers"])
    write_text_atomic(
        out / "eval_dialogues.jsonl",
        _jsonl(
            {
                "users": users,
                "repeat": k // n,
                "instruction": inst.to_dict(),
                "before": b,
                "after": a,
                "kept_before": [inst.keeps(x) for x in b],
                "kept_after": [inst.keeps(x) for x in a],
            }
            for k, (users, inst, b, a) in enumerate(rows)
        ),
    )


def run_gatt(ctx: StageContext) -> dict:
    cfg = ctx.stage_cfg
    if ctx.world_size > 1:
        from align.launch import start_sampling_ranks

        start_sampling_ranks("gatt.train.num_processes", cfg.train.num_processes, ctx.cfg.rollout)
    tokenizer = load_tokenizer(ctx.init_model_dir)
    data = build_dialogues(ctx)
    before_file, sampled_file = ctx.work_dir / "eval_before.json", ctx.work_dir / "sampled.json"
    if ctx.is_main:
        sample(ctx, data, tokenizer, before_file, sampled_file)
    else:
        dist.wait_for_file(sampled_file)
    sampled = read_json(sampled_file)
    s = sampled["stats"]
    records, reference, counts = training_set(ctx, data, sampled)
    dataset, tok_stats = tokenize_conversations(tokenizer, records, cfg.max_length)
    if ctx.is_main:
        print(
            f"[align] {ctx.name}: {len(data.train_dialogues)} dialogues x {cfg.turns} turns -> "
            f"{counts['gatt/data/sampled_samples']} trained answers; {s['sampled_kept']}/{s['checkable_turns']} "
            f"checkable turns kept by sampling, {s['repaired']} repaired; + {counts['gatt/data/reference_samples']} "
            f"reference answers from {counts['gatt/data/reference_conversations']} data conversations; "
            f"{len(records)} sequences",
            flush=True,
        )
    train_summary = train_sft(ctx, dataset, cfg.train, cfg.max_length, packing=True)
    if not ctx.is_main:
        return {}

    summary: dict = {}
    before = after = None
    logger = ctx.logger()
    if data.eval_dialogues:
        saved = read_json(before_file)
        before = {"answers": saved["answers"], "recall": _keyed(saved["recall"])}
        after = evaluate_after(ctx, data, tokenizer)
        summary = recall_summary(before["recall"], after["recall"], cfg.eval_turns)
        logger.log({k: v for k, v in summary.items() if isinstance(v, float)}, train_summary["train/steps"])
    logger.close()
    write_artifacts(ctx, data, sampled, reference, before, after)
    summary.update(
        {
            "gatt/data/dialogues": len(data.train_dialogues),
            **counts,
            "gatt/data/shortened_share": statistics.fmean(i.shortened for i in data.train_insts),
            "gatt/data/checkable_share": statistics.fmean(i.checkable for i in data.train_insts),
            "gatt/data/sampled_kept_share": s["sampled_kept"] / s["checkable_turns"] if s["checkable_turns"] else None,
            "gatt/data/repaired": s["repaired"],
            "gatt/data/cut_by_context": s["cut_by_context"],
            **data.stats,
            **tok_stats,
            **train_summary,
        }
    )
    return summary
