"""GAtt data: the loss mask of a built sample token by token on real chat templates, the instruction
only once, turn-by-turn sampling with best-of by the checker (a fake engine), dialogues from data."""

import random

import pytest

from align.chat import tokenize_chat
from align.gatt.build import (
    answered_turns,
    chat,
    make_dialogues,
    reference_records,
    roll_dialogues,
    trained_answers,
    training_record,
    training_records,
)
from align.gatt.instructions import Instruction, Part
from rollout.types import Rollouts, SamplingParams

END = Part("end_with", "banana", 'End every answer with the word "banana".', "Last word: banana", "end_with")
FIGURE = Part("figure", "Napoleon", "Act as Napoleon.", "Figure: Napoleon", None)
USERS = ["What is the capital of France?", "And of Italy?", "Which one is bigger?"]
ANSWERS = ["Paris, banana.", "Rome, banana.", "Paris is bigger than Rome, banana."]


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request):
    from align.models import embedded_model_dir, load_tokenizer, tiny_model_dir

    return load_tokenizer(tiny_model_dir() if request.param == "tiny" else embedded_model_dir())


@pytest.mark.parametrize("shortened", [False, True])
def test_loss_mask_is_zero_on_every_earlier_turn_token_by_token(tokenizer, shortened):
    inst = Instruction((END, FIGURE), shortened)
    rec = training_record(USERS, ANSWERS, inst)
    msgs = rec["messages"]
    assert [m["train"] for m in msgs] == [False] * 5 + [True]
    t = tokenize_chat(tokenizer, msgs, 4096)

    # Independently: the prompt up to the last answer (generation prompt included) is untrained, the
    # answer and its end-of-turn token are trained, the template's trailing newline is not.
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
    head = tokenizer.apply_chat_template(plain[:-1], tokenize=False, add_generation_prompt=True)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWERS[-1] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert t.input_ids[: len(head_ids)] == head_ids
    assert t.input_ids[len(head_ids) : len(head_ids) + len(answer_ids)] == answer_ids
    expected = [False] * len(head_ids) + [True] * len(answer_ids)
    expected += [False] * (len(t.input_ids) - len(expected))
    assert t.loss_mask == expected
    assert tokenizer.decode([i for i, m in zip(t.input_ids, t.loss_mask) if m]) == ANSWERS[-1] + "<|im_end|>"
    # Nothing of the last user turn, nor of the earlier answers, is trained.
    untrained = tokenizer.decode([i for i, m in zip(t.input_ids, t.loss_mask) if not m])
    assert USERS[-1] in untrained and ANSWERS[0] in untrained and ANSWERS[1] in untrained

    # The instruction appears once, in the first user turn; while sampling it is on every user turn.
    text = tokenizer.decode(t.input_ids)
    assert text.count(inst.text) == 1 and msgs[0]["content"].startswith(inst.text)
    assert all(inst.text not in m["content"] for m in msgs[1:])
    sampling_prompt = chat(USERS, ANSWERS[:2], inst, every_turn=True)
    assert sum(inst.text in m["content"] for m in sampling_prompt) == 3


def test_train_turns_all_trains_every_kept_answer_in_one_sequence():
    inst = Instruction((END,), False)
    answers = ["Paris, banana.", "Rome.", "Paris, banana."]  # turn 2 breaks the instruction
    (rec,) = training_records(USERS, answers, inst, "all")
    assert [m["train"] for m in rec["messages"]] == [False, True, False, False, False, True]
    assert trained_answers(rec) == 2  # the broken answer stays in the context, untrained
    (last,) = training_records(USERS, answers, inst, "last")
    assert [m["train"] for m in last["messages"]] == [False] * 5 + [True]
    assert training_records(USERS, ["Paris, banana.", "Rome.", "Paris."], inst, "last") == []
    # An instruction with nothing to check keeps every turn.
    (rec,) = training_records(USERS, answers, Instruction((FIGURE,), False), "all")
    assert trained_answers(rec) == 3


def test_one_sequence_gives_each_answer_the_context_of_its_own_prefix(tokenizer):
    """Token by token: the answers trained in one sequence are the tokens each prefix sample trains, after
    the same tokens; under causal attention their losses are therefore the prefix samples' losses."""
    inst = Instruction((END, FIGURE), False)
    whole = tokenize_chat(tokenizer, training_records(USERS, ANSWERS, inst, "all")[0]["messages"], 4096)
    trained_at = set()
    for k in range(1, len(USERS) + 1):
        prefix = tokenize_chat(tokenizer, training_record(USERS[:k], ANSWERS[:k], inst)["messages"], 4096)
        at = [i for i, m in enumerate(prefix.loss_mask) if m]
        assert whole.input_ids[: at[-1] + 1] == prefix.input_ids[: at[-1] + 1]
        assert all(whole.loss_mask[i] for i in at)
        trained_at |= set(at)
    assert trained_at == {i for i, m in enumerate(whole.loss_mask) if m}


class ScriptedEngine:
    """Answers turn t of a prompt with candidates 'plain t-j.' except candidate 1, which keeps the rule."""

    def __init__(self):
        self.prompts = []

    def generate(self, chats, sampling):
        self.prompts.append(chats)
        n, texts = sampling.n, []
        for c in chats:
            turn = sum(m["role"] == "user" for m in c)
            texts += [f"answer {turn} banana" if j == 1 else f" plain {turn}-{j}. " for j in range(n)]
        return Rollouts(
            prompt_ids=[[1]] * len(texts),
            response_ids=[[5]] * len(texts),
            logprobs=[[0.0]] * len(texts),
            finish_reasons=["stop"] * len(texts),
            prompt_index=[r // n for r in range(len(texts))],
            texts=texts,
            n=n,
        )


def test_roll_dialogues_samples_turn_by_turn_and_keeps_the_best_by_the_checker():
    eng = ScriptedEngine()
    insts = [Instruction((END,), False), Instruction((FIGURE,), True)]
    answers, stats = roll_dialogues(
        eng.generate,
        [USERS, USERS[:2]],
        insts,
        SamplingParams(max_new_tokens=8),
        every_turn=True,
        best_of=3,
        seed=0,
        fits=lambda c: True,
    )
    assert answers[0] == ["answer 1 banana", "answer 2 banana", "answer 3 banana"]
    assert answers[1] == ["plain 1-0.", "plain 2-0."]  # nothing to check: the first sample, stripped
    assert len(eng.prompts) == 3 and len(eng.prompts[2]) == 1  # the 2-turn dialogue is done after turn 2
    # Turn 3's prompt carries the earlier chosen answers and the instruction on every user turn.
    last = eng.prompts[2][0]
    assert [m["content"] for m in last if m["role"] == "assistant"] == answers[0][:2]
    assert all(m["content"].startswith(insts[0].text) for m in last if m["role"] == "user")
    assert stats == {"sampled_kept": 3, "repaired": 0, "checkable_turns": 3, "cut_by_context": 0}


def test_roll_dialogues_repairs_when_no_sample_keeps_the_instruction_and_stops_at_the_context():
    eng = ScriptedEngine()
    insts = [Instruction((END,), False)]
    answers, stats = roll_dialogues(
        eng.generate,
        [USERS],
        insts,
        SamplingParams(max_new_tokens=8),
        every_turn=False,
        best_of=1,
        seed=0,
        fits=lambda c: len(c) < 4,
        do_repair=True,
    )
    assert answers == [["plain 1-0. Banana.", "plain 2-0. Banana."]]  # the third prompt does not fit
    assert stats["repaired"] == 2 and stats["cut_by_context"] == 1
    second_prompt = eng.prompts[1][0]  # u1 + instruction, a1, u2: the instruction in the first turn only
    assert second_prompt[0]["content"].startswith(insts[0].text) and second_prompt[2]["content"] == USERS[1]


def test_make_dialogues_tops_up_single_prompts_without_repeats():
    seqs = [["a1", "a2"], ["b1"], ["c1"], ["d1"], ["x" * 1000]]
    ds = make_dialogues(seqs, 6, 3, random.Random(0))
    assert len(ds) == 6 and all(len(d) == 3 and len(set(d)) == 3 for d in ds)
    assert ["a1", "a2"] in [d[:2] for d in ds]  # a real multi-turn dialogue keeps its order
    assert all("x" * 1000 not in d for d in ds)  # too-long user turns are not used


def test_answered_turns_pairs_each_user_turn_with_its_answer():
    rec = {
        "messages": [
            {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
            {"role": "user", "content": "Unanswered"},
        ]
    }
    assert answered_turns(rec, "conversation") == [("Hi", "Hello."), ("Bye", "Goodbye.")]
    assert answered_turns({"prompt": [{"role": "user", "content": "Hi"}]}, "prompt") == []


def test_reference_records_repair_every_answer_and_train_every_one():
    convs = [
        [("Name a fruit.", "An apple is a fruit. It is red."), ("And a colour?", "Green is a colour.")],
        [("Say hi.", "Hi there! Nice to meet you.")],
        [("Write code.", "def f(x):\n    return x")],
    ]  # no finished sentence: cannot end with a word
    recs, stats = reference_records(
        convs, 12, 3, lambda: Instruction((END,), False), train_turns="all", rng=random.Random(0), max_answer_chars=600
    )
    assert sum(trained_answers(r) for r in recs) == stats["answers"] == 12
    assert stats["cut"] > 0  # the code answer is never used
    for r in recs:
        msgs = r["messages"]
        assert msgs[0]["content"].startswith(END.long) and all(END.long not in m["content"] for m in msgs[1:])
        answers = [m for m in msgs if m["role"] == "assistant"]
        assert all(m["content"].endswith("Banana.") for m in answers)  # every answer keeps it
        assert [m["train"] for m in msgs] == [m["role"] == "assistant" for m in msgs]
        assert all("def f" not in m["content"] for m in answers)
    # conversations of up to three turns: the data's own turns topped up with other conversations' pairs,
    # ended before an answer that cannot be repaired
    assert 6 in {len(r["messages"]) for r in recs} and all(len(r["messages"]) <= 6 for r in recs)
    assert any(r["messages"][2]["content"] == "And a colour?" for r in recs)  # a real thread keeps its order
    last, _ = reference_records(
        convs, 12, 3, lambda: Instruction((END,), False), train_turns="last", rng=random.Random(0), max_answer_chars=600
    )
    assert len(last) == 12 and all(trained_answers(r) == 1 for r in last)


def test_reference_records_cut_long_answers_to_whole_sentences_and_need_answers():
    long = "This is one sentence. " * 60
    for max_chars in (600, 100):
        recs, _ = reference_records(
            [[("Q?", long)]],
            1,
            3,
            lambda: Instruction((END,), False),
            train_turns="all",
            rng=random.Random(0),
            max_answer_chars=max_chars,
        )
        answer = recs[0]["messages"][-1]["content"]
        assert max_chars - 30 < len(answer) <= max_chars + len(" Banana.") and answer.endswith("sentence. Banana.")
    assert reference_records([], 0, 3, lambda: Instruction((END,), False), "all", random.Random(0), 600) == (
        [],
        {"conversations": 0, "cut": 0, "answers": 0},
    )
    with pytest.raises(ValueError, match="no answered conversation"):
        reference_records([], 4, 3, lambda: Instruction((END,), False), "all", random.Random(0), 600)
    with pytest.raises(ValueError, match="can be repaired"):
        reference_records(
            [[("Write code.", "x = [1,")]], 4, 3, lambda: Instruction((END,), False), "all", random.Random(0), 600
        )
