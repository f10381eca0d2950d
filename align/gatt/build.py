"""Building GAtt training data (Llama 2 sec. 3.3).

1. Dialogues: the user turns of multi-turn data (OASST trees, HH dialogues), topped up with single
   prompts (or built from prompts alone) to the wanted number of turns. Assistant turns of the data
   are not used: the answers are sampled anew.
2. Sampling: the instruction is attached to EVERY user turn and the latest policy answers turn by
   turn (`roll_dialogues`), the best of `best_of` samples by the instruction's checker kept at each
   turn, so the answers keep the instruction throughout.
3. Training samples: the instruction is kept only in the FIRST user turn; the answers are trained and
   every other turn gets ``train=False`` (`training_record`); the loss mask follows from
   align.chat.tokenize_chat.
4. Optionally (`reference_records`), samples of the same form made by program from the data's own
   answers, repaired to keep a checkable instruction: for kinds the policy cannot follow yet.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Optional, Sequence

from align.gatt.checkers import complete_sentences, repair
from align.gatt.instructions import Instruction

# User turns longer than this (characters) are not used: a dialogue of several of them would not fit
# the context, and the instruction would be lost in them.
MAX_USER_CHARS = 400


def attach(user: str, instruction: str) -> str:
    """A user message with the instruction in front (measured on SmolLM2-135M: kept at least as often
    as after the message, and more often than as a system message)."""
    return f"{instruction}\n\n{user}"


def chat(users: Sequence[str], answers: Sequence[str], instruction: Instruction, every_turn: bool) -> list[dict]:
    """The conversation ``u1, a1, ..., u_k`` (len(answers) == k - 1 for a prompt, == k for a whole dialogue)
    with the instruction attached to every user turn (sampling) or only to the first (GAtt's target)."""
    msgs = []
    for t, u in enumerate(users):
        content = attach(u, instruction.text) if (t == 0 or every_turn) else u
        msgs.append({"role": "user", "content": content})
        if t < len(answers):
            msgs.append({"role": "assistant", "content": answers[t]})
    return msgs


def training_record(
    users: Sequence[str], answers: Sequence[str], instruction: Instruction, trained: Optional[Sequence[bool]] = None
) -> dict:
    """A conversation record (align/data/schema.py) in GAtt's form: the instruction in the first user
    turn only; the loss on the answers flagged in ``trained`` (default: the last one alone), every other
    turn ``train=False``."""
    if len(users) != len(answers) or not answers:
        raise ValueError(
            f"a training dialogue needs one answer per user turn; got {len(users)} users, {len(answers)} answers"
        )
    trained = list(trained) if trained is not None else [False] * (len(answers) - 1) + [True]
    msgs = chat(users, answers, instruction, every_turn=False)
    return {
        "messages": [{**m, "train": m["role"] == "assistant" and trained[i // 2]} for i, m in enumerate(msgs)],
        "source": "gatt",
    }


def training_records(
    users: Sequence[str], answers: Sequence[str], instruction: Instruction, train_turns: str, only_kept: bool = True
) -> list[dict]:
    """The training sample of one sampled dialogue (a list of one, or none when nothing is left to train).

    ``train_turns="all"``: every answer is trained, in one sequence. Attention is causal, so each answer
    sees exactly the turns before it, and its loss is that of a sample cut at its end: the same
    per-token losses as one sample per prefix, at about half the tokens over three turns. ``"last"``:
    only the last answer. With ``only_kept``, an answer that breaks a checkable instruction is not
    trained (it stays in the context of later turns, where the policy's own answer was)."""
    keeps = [not (only_kept and instruction.keeps(a) is False) for a in answers]
    trained = keeps if train_turns == "all" else [False] * (len(answers) - 1) + [keeps[-1]]
    return [training_record(users, answers, instruction, trained)] if any(trained) else []


def trained_answers(record: dict) -> int:
    """How many answers of a conversation record carry the loss."""
    return sum(bool(m.get("train")) for m in record["messages"] if m["role"] == "assistant")


def user_turns(record: dict, kind: str) -> list[str]:
    """The user messages of a conversation or prompt record, in order."""
    msgs = record["messages"] if kind == "conversation" else record["prompt"]
    return [m["content"].strip() for m in msgs if m["role"] == "user" and m["content"].strip()]


def answered_turns(record: dict, kind: str) -> list[tuple[str, str]]:
    """The (user, assistant) turn pairs of a conversation record, in order, up to its first user turn
    without an answer; none for a prompt record."""
    if kind != "conversation":
        return []
    msgs, pairs = record["messages"], []
    for m, nxt in zip(msgs, msgs[1:]):
        if m["role"] != "user":
            continue
        if nxt["role"] != "assistant" or not m["content"].strip() or not nxt["content"].strip():
            break
        pairs.append((m["content"].strip(), nxt["content"].strip()))
    return pairs


def _fit_answer(answer: str, max_chars: int) -> str:
    """The answer cut to its whole sentences within ``max_chars`` ("" when none fits)."""
    return answer if len(answer) <= max_chars else complete_sentences(answer[:max_chars])


def reference_records(
    conversations: Sequence[Sequence[tuple[str, str]]],
    n: int,
    turns: int,
    sample_instruction: Callable[[], Instruction],
    train_turns: str,
    rng: random.Random,
    max_answer_chars: int,
) -> tuple[list[dict], dict]:
    """Training samples made by program from the data's own answers (no sampling), ``n`` trained answers
    in all.

    Each conversation (its first ``turns`` answered turns, topped up to ``turns`` with (user, answer)
    pairs drawn from the other conversations, as `make_dialogues` tops up user turns) gets an
    instruction of checkable kinds from ``sample_instruction``; every answer is repaired to keep it
    (checkers.repair) and the conversation ends before the first answer that cannot be; the samples
    are GAtt's (`training_records`: the instruction in the first user turn, the loss by ``train_turns``).
    They teach a kind the policy cannot follow yet, where best-of-K sampling finds no answer that
    keeps it (measured: SmolLM2-135M ends 5% of its answers with an asked-for word). Conversations are
    used in turn, again from the start (with a new instruction) when all are used, until ``n``
    answers are trained (or every conversation was tried 64 times).

    Every answer is first cut to its whole sentences within ``max_answer_chars``, so the policy learns
    answers that end inside the evaluation's answer budget.

    Returns the records and stats: ``conversations`` used, ``cut`` (turns dropped as unrepairable),
    ``answers`` (trained answers).
    """
    convs = [
        [(u, _fit_answer(a, max_answer_chars)) for u, a in c[:turns] if len(u) <= MAX_USER_CHARS] for c in conversations
    ]
    convs = [c for c in convs if c]
    out: list[dict] = []
    stats = {"conversations": 0, "cut": 0, "answers": 0}
    if n <= 0:
        return out, stats
    if not convs:
        raise ValueError(
            "gatt.reference_samples: the dialogue data has no answered conversation (alpaca or oasst "
            "data has answers; prompt sets do not)"
        )
    i = 0
    while stats["answers"] < n and i < len(convs) * 64:
        conv = list(convs[i % len(convs)])
        i += 1
        for _ in range(8 * turns):  # a few draws: a tiny data set may not have `turns` distinct pairs
            if len(conv) >= turns:
                break
            extra = convs[rng.randrange(len(convs))]
            pair = extra[rng.randrange(len(extra))]
            if pair not in conv:
                conv.append(pair)
        inst = sample_instruction()
        users, answers = [], []
        for u, a in conv:
            fixed = repair(a, inst.constraints)
            if not a or not inst.keeps(fixed):
                stats["cut"] += len(conv) - len(answers)
                break
            users.append(u)
            answers.append(fixed)
        if answers:
            if train_turns == "all":  # the last conversation is cut to the answers still wanted
                users, answers = users[: n - stats["answers"]], answers[: n - stats["answers"]]
            stats["conversations"] += 1
            for r in training_records(users, answers, inst, train_turns):
                stats["answers"] += trained_answers(r)
                out.append({**r, "source": "gatt_reference", "instruction": inst.to_dict()})
    if not out:
        raise ValueError(
            "gatt.reference_samples: no data answer can be repaired to keep the bank's checkable "
            "instructions; set reference_samples: 0 or add checkable kinds the program can repair"
        )
    return out, stats


def make_dialogues(sequences: Sequence[Sequence[str]], n: int, turns: int, rng: random.Random) -> list[list[str]]:
    """``n`` dialogues of ``turns`` user turns each.

    Dialogue i starts with the (usable) user turns of ``sequences[i % len]`` and is topped up with
    turns drawn from all the sequences' turns (without repeating a turn inside a dialogue while
    enough are left), so single prompts become multi-turn dialogues.
    """
    seqs = [[u for u in s if len(u) <= MAX_USER_CHARS] for s in sequences]
    seqs = [s for s in seqs if s]
    if not seqs:
        raise ValueError(f"no user turn of at most {MAX_USER_CHARS} characters in the dialogue data")
    pool = sorted({u for s in seqs for u in s})
    order = list(range(len(seqs)))
    rng.shuffle(order)
    out = []
    for i in range(n):
        d = list(seqs[order[i % len(order)]][:turns])
        fresh = [u for u in pool if u not in d]
        while len(d) < turns:
            if not fresh:
                fresh = list(pool)
            d.append(fresh.pop(rng.randrange(len(fresh))))
        out.append(d)
    return out


def pick(candidates: Sequence[str], instruction: Instruction) -> tuple[str, Optional[float]]:
    """The candidate that keeps the most checkable parts (ties: the first); the first when none is checkable."""
    scores = [instruction.score(c) for c in candidates]
    if scores[0] is None:
        return candidates[0], None
    best = max(range(len(candidates)), key=lambda j: (scores[j], -j))
    return candidates[best], scores[best]


def roll_dialogues(
    generate: Callable,
    dialogues: Sequence[Sequence[str]],
    instructions: Sequence[Instruction],
    sampling,
    every_turn: bool,
    best_of: int,
    seed: int,
    fits: Callable[[list[dict]], bool],
    do_repair: bool = False,
    desc: str = "dialogue turns",
) -> tuple[list[list[str]], dict]:
    """Answer every dialogue turn by turn with the policy.

    Args:
        generate: ``engine.generate(chats, SamplingParams) -> Rollouts``.
        dialogues: user turns per dialogue.
        instructions: one per dialogue.
        sampling: `rollout.types.SamplingParams`; ``n`` and ``seed`` are set here (``best_of``, and a
            seed derived from ``seed`` and the turn, so the same call gives the same answers).
        every_turn: attach the instruction to every user turn (data building) or the first only (evaluation).
        best_of: samples per turn; the best by the instruction's checker is kept (`pick`).
        fits: whether a prompt leaves room for an answer in the engine's context; a dialogue whose
            next prompt does not fit ends there.
        do_repair: when no sample keeps a checkable instruction, repair the best one (checkers.repair).

    Returns:
        answers: per dialogue, one answer per turn reached (fewer than its user turns if it ran out of context).
        stats: ``sampled_kept`` (turns where a sample kept a checkable instruction), ``repaired``,
            ``checkable_turns``, ``cut_by_context`` (dialogues that ended early).
    """
    from tqdm import tqdm

    from rollout.types import derive_seed

    answers: list[list[str]] = [[] for _ in dialogues]
    stats = {"sampled_kept": 0, "repaired": 0, "checkable_turns": 0, "cut_by_context": 0}
    alive = list(range(len(dialogues)))
    for t in tqdm(range(max((len(d) for d in dialogues), default=0)), desc=desc, unit="turn", leave=False):
        chats, idx = [], []
        for i in alive:
            if t >= len(dialogues[i]):
                continue
            c = chat(dialogues[i][: t + 1], answers[i], instructions[i], every_turn)
            if fits(c):
                chats.append(c)
                idx.append(i)
            else:
                stats["cut_by_context"] += 1
        if not idx:
            break
        rollouts = generate(chats, replace(sampling, n=best_of, seed=derive_seed(seed, t)))
        for j, i in enumerate(idx):
            cands = [x.strip() for x in rollouts.texts[j * best_of : (j + 1) * best_of]]
            answer, score = pick(cands, instructions[i])
            if score is not None:
                stats["checkable_turns"] += 1
                if score == 1.0:
                    stats["sampled_kept"] += 1
                elif do_repair:
                    fixed = repair(answer, instructions[i].constraints)
                    if instructions[i].keeps(fixed):
                        answer = fixed
                        stats["repaired"] += 1
            answers[i].append(answer)
        alive = idx
    return answers, stats
