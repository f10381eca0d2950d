"""Held-out splits and the reward models' data mixtures (Llama 2 sec. 3.2.2, "Data composition").

Helpfulness RM: all helpfulness data plus an equal share drawn from the rest (secondary_share 0.5).
Safety RM: all safety data, mixed 90/10 with helpfulness data (secondary_share 0.1).
Pure functions of record lists; deterministic given the seed.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def holdout(records: Sequence[dict], test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off `test_size` records per `source` as a fixed test set; returns (train, test).

    A source with fewer than 2 * test_size records gives half of them to the test set, so no source
    is trained on in full while reported on empty.
    """
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r["source"]].append(i)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for source in sorted(by_source):
        idx = by_source[source]
        k = min(test_size, len(idx) // 2)
        test_idx.update(rng.sample(idx, k))
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test


def mix(primary: Sequence[dict], secondary: Sequence[dict], secondary_share: float, seed: int) -> list[dict]:
    """All of `primary` plus secondary records making up `secondary_share` of the result, shuffled.

    n_secondary = round(len(primary) * share / (1 - share)), capped by what `secondary` holds.
    """
    if not 0 <= secondary_share < 1:
        raise ValueError(f"secondary_share={secondary_share}: must be in [0, 1)")
    rng = random.Random(seed)
    want = round(len(primary) * secondary_share / (1 - secondary_share))
    picked = rng.sample(list(secondary), min(want, len(secondary)))
    out = list(primary) + picked
    rng.shuffle(out)
    return out
