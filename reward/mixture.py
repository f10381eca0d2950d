"""Held-out splits and the reward models' data mixtures (Llama 2 sec. 3.2.2, "Data composition").

Helpfulness RM: all helpfulness data plus an equal share drawn from the rest (secondary_share 0.5).
Safety RM: all safety data, mixed 90/10 with helpfulness data (secondary_share 0.1).
Pure functions of record lists; deterministic given the seed.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Sequence

from align.data.dedup import prompt_key  # noqa: F401  (re-exported: the one definition of a prompt's key)


def holdout(records: Sequence[dict], test_size: int, seed: int, per_prompt: int = 0) -> tuple[list[dict], list[dict]]:
    """Split off about `test_size` records per `source` as a fixed test set, by prompt; returns (train, test).

    Whole prompts go to the test set (the pairs of a drawn prompt, until the source has `test_size`
    pairs: the last prompt drawn may take it a little over), so no test prompt is trained on. With
    ``per_prompt`` > 0 a drawn prompt puts at most that many of its pairs in the test set and the rest
    in neither set: the test set then spans more prompts (one AlpacaEval instruction has ~33 pairs, so
    120 test pairs would otherwise come from ~4 instructions). A source with fewer than 2 * test_size
    records gives at most half of them to the test set, so none is trained on in full while reported
    on empty.
    """
    by_source: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for i, r in enumerate(records):
        by_source[r["source"]].setdefault(prompt_key(r), []).append(i)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    held: set[int] = set()  # every pair of a test prompt
    for source in sorted(by_source):
        groups = list(by_source[source].values())  # first-appearance order, then shuffled by the seed
        rng.shuffle(groups)
        cap = min(test_size, sum(map(len, groups)) // 2)
        taken = 0
        for g in groups:
            if taken >= cap:
                break
            pick = rng.sample(g, per_prompt) if 0 < per_prompt < len(g) else g
            if taken + len(pick) > 2 * cap and taken > 0:
                continue  # a prompt with many pairs would overshoot by far: draw the next
            test_idx.update(pick)
            held.update(g)
            taken += len(pick)
    train = [r for i, r in enumerate(records) if i not in held]
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


LENGTH_RATIO_BINS = (0.25, 0.5, 1.0)  # |log2(len chosen / len rejected)| edges: balance_length balances within each


def length_ratio_bin(chosen: str, rejected: str) -> int:
    """Which `LENGTH_RATIO_BINS` bin the pair's answer-length ratio falls in (characters)."""
    ratio = abs(math.log2(max(len(chosen), 1) / max(len(rejected), 1)))
    return sum(ratio >= edge for edge in LENGTH_RATIO_BINS)


def balance_length(records: Sequence[dict], seed: int) -> list[dict]:
    """Per source and per bin of the length ratio, as many pairs whose chosen answer is longer (in
    characters) as pairs where it is shorter: the surplus side is subsampled, pairs of equal length all
    kept. Order is kept.

    An RM trained on the result cannot lower its loss by counting tokens. Balancing the counts alone
    was not enough: in the AlpacaEval pairs (79% chosen longer) the chosen-longer pairs differ by far
    more, so a reward that grew with length still won more on them than it lost on the others
    (measured: correlation of reward and length +0.69 after training on count-balanced pairs).
    """
    rng = random.Random(seed)
    cells: dict[tuple[str, int], dict[str, list[int]]] = defaultdict(lambda: {"longer": [], "shorter": []})
    for i, r in enumerate(records):
        c, j = len(r["chosen"]), len(r["rejected"])
        if c != j:
            cells[(r["source"], length_ratio_bin(r["chosen"], r["rejected"]))]["longer" if c > j else "shorter"].append(
                i
            )
    drop: set[int] = set()
    for key in sorted(cells):
        longer, shorter = cells[key]["longer"], cells[key]["shorter"]
        big, small = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
        drop.update(rng.sample(big, len(big) - len(small)))
    return [r for i, r in enumerate(records) if i not in drop]
