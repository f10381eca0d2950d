from collections import Counter

from reward.mixture import holdout, mix


def _recs(source, n):
    return [{"source": source, "i": i} for i in range(n)]


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
