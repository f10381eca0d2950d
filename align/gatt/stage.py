"""Ghost Attention stage (Llama 2 sec. 3.3).

setup (instruction bank, dialogues split into training and held-out) -> recall of the init policy
(instruction in the first turn only; align/gatt/evaluate.py) -> sample the training dialogues with
the instruction on every user turn, best of `best_of` by the checker (align/gatt/build.py) -> keep the
instruction in the first user turn only (plus `reference_samples` made by program from the data's own
answers), train only the last assistant turn (align.sft.train_sft) ->
recall of the fine-tuned policy.

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
from pathlib import Path

from align.errors import AlignError
from align.io import read_json, write_json_atomic, write_text_atomic
from align.launch import dist


def load_user_sequences(ctx) -> tuple[list[tuple[list[str], list[tuple[str, str]]]], dict]:
    """Per record of every listed dataset: its user turns (of conversations where the format has them,
    of prompts otherwise) and its answered (user, assistant) turns (none for prompts)."""
    from align.data.importers import FORMAT_KINDS
    from align.data.load import load_records

    from align.gatt.build import answered_turns, user_turns

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
        from align.data.dedup import drop_duplicates

        seqs, counts["data/duplicates_dropped"] = drop_duplicates(seqs, key=json.dumps)
    return seqs, counts


def split_dialogues(loaded: list, n_eval: int, seed: int, dedup: bool = True) -> tuple[list, list, int]:
    """(held-out user-turn sequences, training entries, how many held-out ones were dropped): ``n_eval`` of
    the loaded (users, answered) entries held out by ``seed``; with ``dedup``, less those whose opening user
    turn (where the instruction goes) also opens a training entry."""
    from align.data.dedup import drop_overlap

    loaded = list(loaded)
    random.Random(f"{seed}/gatt/split").shuffle(loaded)
    held, train, overlap = loaded[:n_eval], loaded[n_eval:], 0
    if dedup:
        held, overlap = drop_overlap(held, train, key=lambda entry: entry[0][0])
    return [users for users, _ in held], train, overlap


def _fits(tokenizer, max_model_len: int, max_new_tokens: int):
    from align.chat import prompt_ids

    return lambda chat: len(prompt_ids(tokenizer, chat)) + max_new_tokens <= max_model_len


def _sampling(cfg, max_new_tokens: int = 0):
    from rollout.types import SamplingParams

    return SamplingParams(
        n=1,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        max_new_tokens=max_new_tokens or cfg.sampling.max_new_tokens,
    )


def _evaluate(engine, dialogues, instructions, ctx, sampling, fits, label: str) -> tuple[list[list[str]], dict]:
    from align.gatt.build import roll_dialogues
    from align.gatt.evaluate import recall_by_turn

    cfg = ctx.stage_cfg
    # The same seed before and after GAtt: both policies answer the same held-out draw.
    answers, stats = roll_dialogues(
        engine.generate,
        dialogues,
        instructions,
        sampling,
        every_turn=False,
        best_of=1,
        seed=ctx.cfg.seed + 1,
        fits=fits,
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


def run_gatt(ctx) -> dict:
    from align.gatt.build import make_dialogues, reference_records, roll_dialogues, training_records
    from align.gatt.evaluate import markdown_table
    from align.gatt.instructions import InstructionBank
    from align.models import load_tokenizer
    from align.sft import tokenize_conversations, train_sft
    from rollout import make_engine

    cfg = ctx.stage_cfg
    seed = ctx.cfg.seed
    if ctx.world_size > 1:
        from align.launch import start_sampling_ranks

        start_sampling_ranks("gatt.train.num_processes", cfg.train.num_processes, ctx.cfg.rollout)
    tokenizer = load_tokenizer(ctx.init_model_dir)
    bank = InstructionBank.load(cfg.instructions)
    ref_kinds = bank.checkable_names(cfg.reference_kinds, "gatt.reference_kinds")
    loaded, data_stats = load_user_sequences(ctx)
    eval_seqs, train_loaded, data_stats["data/heldout_overlap_dropped"] = split_dialogues(
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
    # one held-out dialogue per held-out sequence left (eval_dialogues of them unless some overlapped training)
    held_out = (
        make_dialogues(eval_seqs, len(eval_seqs), max_turn, random.Random(f"{seed}/gatt/eval")) if eval_seqs else []
    )
    eval_dialogues, eval_insts = evaluation_draws(bank, held_out, cfg.eval_repeats, seed)
    sampling, eval_sampling = _sampling(cfg), _sampling(cfg, cfg.eval_max_new_tokens)
    fits = _fits(tokenizer, ctx.cfg.rollout.max_model_len, sampling.max_new_tokens)
    eval_fits = _fits(tokenizer, ctx.cfg.rollout.max_model_len, eval_sampling.max_new_tokens)
    before_file, sampled_file = ctx.work_dir / "eval_before.json", ctx.work_dir / "sampled.json"
    engine = None
    if not ctx.is_main:
        dist.wait_for_file(sampled_file)
    try:
        if ctx.is_main and eval_dialogues and not before_file.is_file():
            engine = make_engine(ctx.cfg.rollout, ctx.init_model_dir, seed, dtype=ctx.cfg.compute.dtype)
            answers, recall = _evaluate(engine, eval_dialogues, eval_insts, ctx, eval_sampling, eval_fits, "before")
            write_json_atomic(before_file, {"answers": answers, "recall": recall})
        if ctx.is_main and not sampled_file.is_file():
            engine = engine or make_engine(ctx.cfg.rollout, ctx.init_model_dir, seed, dtype=ctx.cfg.compute.dtype)
            answers, stats = roll_dialogues(
                engine.generate,
                train_dialogues,
                train_insts,
                sampling,
                every_turn=True,
                best_of=cfg.best_of,
                seed=seed,
                fits=fits,
                do_repair=cfg.repair,
                desc="sampling",
            )
            write_json_atomic(sampled_file, {"answers": answers, "stats": stats})
    finally:
        if engine is not None:
            engine.close()
    sampled = read_json(sampled_file)

    records = []
    for users, answers, inst in zip(train_dialogues, sampled["answers"], train_insts):
        records += training_records(users[: len(answers)], answers, inst, cfg.every_prefix)
    n_sampled = len(records)
    # Program-made samples from the training dialogues' own answers (never the held-out ones).
    rrng = random.Random(f"{seed}/gatt/reference")
    try:
        reference, ref_stats = reference_records(
            [pairs for _, pairs in train_loaded if pairs],
            cfg.reference_samples,
            cfg.turns,
            lambda: bank.sample(rrng, cfg.shorten_prob, only=ref_kinds, max_parts=cfg.reference_max_parts),
            cfg.every_prefix,
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
    dataset, tok_stats = tokenize_conversations(tokenizer, records, cfg.max_length)
    if ctx.is_main:
        s = sampled["stats"]
        print(
            f"[align] {ctx.name}: {len(train_dialogues)} dialogues x {cfg.turns} turns -> {n_sampled} training "
            f"samples; {s['sampled_kept']}/{s['checkable_turns']} checkable turns kept by sampling, "
            f"{s['repaired']} repaired; + {len(reference)} reference samples from "
            f"{ref_stats['conversations']} data conversations",
            flush=True,
        )
    train_summary = train_sft(ctx, dataset, cfg.train, cfg.max_length, packing=True)
    if not ctx.is_main:
        return {}

    before = read_json(before_file) if eval_dialogues else None
    logger = ctx.logger()
    after = None
    if eval_dialogues:
        engine = make_engine(ctx.cfg.rollout, ctx.out_dir / "model", seed, dtype=ctx.cfg.compute.dtype)
        try:
            after_answers, after_recall = _evaluate(
                engine, eval_dialogues, eval_insts, ctx, eval_sampling, eval_fits, "after"
            )
        finally:
            engine.close()
        after = {"answers": after_answers, "recall": after_recall}

    out = ctx.out_dir
    write_text_atomic(
        out / "dialogues.jsonl",
        "".join(
            json.dumps(
                {
                    "users": users[: len(ans)],
                    "answers": ans,
                    "instruction": inst.to_dict(),
                    "kept": [inst.keeps(a) for a in ans],
                }
            )
            + "\n"
            for users, ans, inst in zip(train_dialogues, sampled["answers"], train_insts)
        ),
    )
    write_text_atomic(out / "reference.jsonl", "".join(json.dumps(r) + "\n" for r in reference))
    summary: dict = {}
    if eval_dialogues:
        from align.stats import wilson

        rb, ra = _keyed(before["recall"]), after["recall"]
        for name, rec in (("before", rb), ("after", ra)):
            for t in cfg.eval_turns:
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
        for name, rec in (("before", rb), ("after", ra)):
            for kind, table in rec["by_kind"].items():
                for t in cfg.eval_turns:
                    summary[f"gatt/recall_{name}/turn{t}/{kind}"] = table[t]["recall"]
        write_json_atomic(
            out / "eval.json",
            {
                "turns": list(cfg.eval_turns),
                "before": rb,
                "after": ra,
                "n_dialogues": len(held_out),
                "repeats": cfg.eval_repeats,
                "instructions": [i.to_dict() for i in eval_insts],
            },
        )
        write_text_atomic(out / "eval.md", markdown_table(rb, ra, cfg.eval_turns))
        write_text_atomic(
            out / "eval_dialogues.jsonl",
            "".join(
                json.dumps(
                    {
                        "users": users,
                        "repeat": i // len(held_out),
                        "instruction": inst.to_dict(),
                        "before": b,
                        "after": a,
                        "kept_before": [inst.keeps(x) for x in b],
                        "kept_after": [inst.keeps(x) for x in a],
                    }
                )
                + "\n"
                for i, (users, inst, b, a) in enumerate(
                    zip(eval_dialogues, eval_insts, before["answers"], after["answers"])
                )
            ),
        )
        logger.log({k: v for k, v in summary.items() if isinstance(v, float)}, train_summary["train/steps"])
    logger.close()
    s = sampled["stats"]
    summary.update(
        {
            "gatt/data/dialogues": len(train_dialogues),
            "gatt/data/samples": len(records),
            "gatt/data/sampled_samples": n_sampled,
            "gatt/data/reference_samples": len(reference),
            "gatt/data/reference_turns_cut": ref_stats["cut"],
            "gatt/data/shortened_share": statistics.fmean(i.shortened for i in train_insts),
            "gatt/data/checkable_share": statistics.fmean(i.checkable for i in train_insts),
            "gatt/data/sampled_kept_share": s["sampled_kept"] / s["checkable_turns"] if s["checkable_turns"] else None,
            "gatt/data/repaired": s["repaired"],
            "gatt/data/cut_by_context": s["cut_by_context"],
            **data_stats,
            **tok_stats,
            **train_summary,
        }
    )
    return summary
