from collections import Counter

from align.data.dedup import drop_overlap
from reward.mixture import balance_length, holdout, mix, prompt_key


def _recs(source, n, per_prompt=1):
    return [
        {"source": source, "i": i, "prompt": [{"role": "user", "content": f"{source} {i // per_prompt}"}]}
        for i in range(n)
    ]


def test_holdout_takes_test_size_per_source_and_is_fixed_by_seed():
    recs = _recs("a", 50) + _recs("b", 30) + _recs("c", 6)
    train, test = holdout(recs, 10, seed=0)
    assert Counter(r["source"] for r in test) == {"a": 10, "b": 10, "c": 3}  # c: half of 6
    assert len(train) + len(test) == len(recs)
    assert not {id(r) for r in train} & {id(r) for r in test}
    assert holdout(recs, 10, seed=0)[1] == test
    assert holdout(recs, 10, seed=1)[1] != test


def test_mix_equal_share_and_90_10():
    p, s = _recs("p", 90), _recs("s", 200)
    half = mix(p, s, 0.5, seed=0)
    assert Counter(r["source"] for r in half) == {"p": 90, "s": 90}
    tenth = mix(p, s, 0.1, seed=0)
    assert Counter(r["source"] for r in tenth) == {"p": 90, "s": 10}
    assert Counter(r["source"] for r in mix(p, s[:5], 0.5, seed=0)) == {"p": 90, "s": 5}  # capped
    assert Counter(r["source"] for r in mix(p, s, 0.0, seed=0)) == {"p": 90}


def test_holdout_takes_whole_prompts():
    recs = _recs("a", 120, per_prompt=6)  # 20 prompts of 6 pairs
    train, test = holdout(recs, 20, seed=0)
    assert len(test) == 24  # 4 whole prompts: the last drawn takes it past 20
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}
    assert len(train) + len(test) == len(recs)


def test_drop_overlap_removes_a_held_out_prompt_from_another_source():
    a, b = _recs("a", 10), _recs("a", 10)
    for r in b:
        r["source"] = "b"  # same prompts, another source
    assert drop_overlap(b, a[:3]) == (b[3:], 3)


def test_balance_length_evens_chosen_longer_and_shorter_per_source():
    recs = []
    for i in range(40):  # source a: 30 chosen longer, 10 shorter; source b: 5 and 5; 2 ties
        longer = i < 30
        recs.append({"source": "a", "chosen": "x" * (20 if longer else 5), "rejected": "y" * 10, "i": i})
    recs += [{"source": "b", "chosen": "x" * (20 if i < 5 else 5), "rejected": "y" * 10, "i": i} for i in range(10)]
    recs += [{"source": "b", "chosen": "same", "rejected": "four", "i": 99}] * 2
    out = balance_length(recs, seed=0)
    count = Counter(
        (r["source"], len(r["chosen"]) > len(r["rejected"]), len(r["chosen"]) == len(r["rejected"])) for r in out
    )
    assert count == {
        ("a", True, False): 10,
        ("a", False, False): 10,
        ("b", True, False): 5,
        ("b", False, False): 5,
        ("b", False, True): 2,
    }
    assert out == [r for r in recs if r in out]  # order kept
    assert balance_length(recs, seed=0) == out


def test_balance_length_balances_within_length_ratio_bins():
    # chosen much longer (2x) in 10 pairs, slightly shorter (0.9x) in 10: no bin holds both, nothing survives
    far = [{"source": "a", "chosen": "x" * 40, "rejected": "y" * 20}] * 10
    near = [{"source": "a", "chosen": "x" * 18, "rejected": "y" * 20}] * 10
    assert balance_length(far + near, seed=0) == []
    both = far + near + [{"source": "a", "chosen": "x" * 20, "rejected": "y" * 40}] * 3
    assert len(balance_length(both, seed=0)) == 6  # 3 + 3 in the 2x bin


def test_holdout_per_prompt_spreads_the_test_set_over_more_prompts():
    recs = _recs("a", 120, per_prompt=6)  # 20 prompts of 6 pairs
    train, test = holdout(recs, 20, seed=0, per_prompt=2)
    assert len(test) == 20 and len({prompt_key(r) for r in test}) == 10
    assert len(train) == 120 - 10 * 6  # a test prompt's other pairs are used nowhere
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}
