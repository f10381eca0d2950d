"""Exact duplicates and train/held-out overlap (align/data/dedup.py) on hand-made records."""

from align.data.dedup import drop_duplicates, drop_overlap, prompt_key, record_key


def _user(text):
    return {"role": "user", "content": text}


def _chat(question, answer, system=None):
    msgs = [{"role": "system", "content": system, "train": False}] if system else []
    return {
        "messages": msgs
        + [{**_user(question), "train": False}, {"role": "assistant", "content": answer, "train": True}],
        "source": "s",
    }


def _pair(prompt, chosen, rejected, rating="better", source="s"):
    return {
        "prompt": [_user(prompt)],
        "chosen": chosen,
        "rejected": rejected,
        "rating": rating,
        "category": "helpfulness",
        "source": source,
    }


def test_exact_duplicate_conversations_go_the_first_kept():
    recs = [
        _chat("Hi", "Hello"),
        _chat("Hi", "Hello"),
        _chat("Hi", "Hello."),
        _chat("hi", "Hello"),
        _chat("Hi ", "Hello"),
        _chat("Hi", "Hello", system="Be brief."),
        _chat("Hi", "Hello"),
    ]
    kept, n = drop_duplicates(recs)
    assert n == 2 and kept == [recs[0], *recs[2:6]]  # punctuation, case, whitespace, a system turn: kept
    assert kept[0] is recs[0]


def test_a_pair_rated_twice_is_one_pair_but_swapped_or_edited_answers_are_not():
    a = _pair("Q", "good", "bad")
    recs = [
        a,
        _pair("Q", "good", "bad", rating="slightly_better", source="other"),  # same pair, other labels
        _pair("Q", "bad", "good"),
        _pair("Q", "good", "bad "),
        _pair("Q2", "good", "bad"),
    ]
    kept, n = drop_duplicates(recs)
    assert n == 1 and kept == [a, *recs[2:]]
    # against records already kept elsewhere (the other side of a mixture)
    assert drop_duplicates([_pair("Q", "good", "bad"), _pair("Q3", "x", "y")], seen=[a])[1] == 1


def test_prompt_records_are_duplicates_by_their_prompt_alone():
    p = {"prompt": [_user("Tell me a joke.")], "safety": False, "source": "a"}
    q = {"prompt": [_user("Tell me a joke.")], "safety": True, "source": "b"}
    r = {"prompt": [_user("Tell me a joke!")], "safety": False, "source": "a"}
    assert drop_duplicates([p, q, r]) == ([p, r], 1)
    assert record_key(p) == prompt_key(p)


def test_overlap_drops_held_out_items_whose_prompt_is_trained_on():
    train = [_chat("Hi", "Hello"), _chat("Name a colour.", "Blue.")]
    held = [
        _chat("Hi", "Hey there"),  # same prompt, another answer: overlaps
        _chat("Hi", "Hey there", system="Be brief."),  # another prompt (a system turn)
        _chat("Name a colour", "Red."),
    ]  # near-duplicate prompt: kept
    kept, n = drop_overlap(held, train)
    assert n == 1 and kept == held[1:]
    # a conversation's prompt is its turns before the first answer, loss flags aside
    assert prompt_key(_chat("Hi", "Hello")) == prompt_key({"prompt": [_user("Hi")]})
    assert drop_overlap(held, []) == (held, 0)


def test_overlap_with_a_custom_key():
    held, n = drop_overlap([("a", 1), ("b", 2), ("c", 3)], [("b", 9)], key=lambda x: x[0])
    assert n == 1 and held == [("a", 1), ("c", 3)]
