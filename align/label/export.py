"""A round's labels -> canonical preference records (align/data/schema.py), by majority vote.

Gold pairs (a known answer, for measuring labelers: align/label/agreement.py) are left out of
everything here: no record, no agreement row, counted only as ``label/gold_pairs``.

Per pair (the votes are the latest label of each labeler):

0. ``min_votes`` (the pipeline's rounds labeled by people: the round's labels_per_pair): a pair
   with fewer votes that are not skips is dropped ("incomplete"): its round was called complete
   without it (``label.min_complete_share``).
1. Skips: ``skips="ignore"`` leaves skip votes out (the other votes decide); ``"drop_pair"`` drops a
   pair that any labeler skipped (a skip often means both answers are unusable).
2. Majority: the choice (a | b | tie) with the most votes wins; a tie for the most votes (1 a, 1 b)
   drops the pair ("no_majority"), as does a pair no one voted on.
3. A winning ``tie``: ``ties="drop"`` (the default: a tie says neither answer is better, and an
   order picked at random would add a pair whose label is a coin flip) drops it;
   ``ties="negligible"`` keeps it as ``negligibly_better`` with the order drawn from (seed, pair id).
4. Rating: the median of the winners' ratings, in RATINGS order; between two middle ratings the
   weaker one (a disputed strength is not overstated).
5. Safety: per response, the majority of the counted voters' flags; an even split is None (unknown).
   With ``drop_unsafe_chosen`` a pair whose chosen response is unsafe and rejected safe is dropped
   (recipe sec. 3.2.1).

Output (`write_export`): ``preference.jsonl`` (the records; loads with
``datasets.load_dataset("json", ..., features=PREFERENCE_FEATURES)`` via `load_export`, and with the
``trl_jsonl`` importer), ``agreement.jsonl`` (per pair: the vote counts, the agreement share, kept or
why dropped) and ``stats.json``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from align.data.schema import RATINGS
from align.errors import AlignError
from align.label.config import SKIP_POLICIES, TIE_POLICIES, LabelConfig

_DEFAULT = {f: LabelConfig.__dataclass_fields__[f].default for f in ("ties", "skips", "drop_unsafe_chosen")}
RECORDS_FILE = "preference.jsonl"
AGREEMENT_FILE = "agreement.jsonl"
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class ExportPolicy:
    """How votes become records; the defaults are LabelConfig's."""

    ties: str = _DEFAULT["ties"]
    skips: str = _DEFAULT["skips"]
    drop_unsafe_chosen: bool = _DEFAULT["drop_unsafe_chosen"]
    seed: int = 0
    min_votes: int = 0  # votes (not skips) a pair needs to be kept; 0 = any

    def __post_init__(self):
        if self.ties not in TIE_POLICIES:
            raise AlignError(f"ties={self.ties!r}: must be one of {', '.join(TIE_POLICIES)}")
        if self.skips not in SKIP_POLICIES:
            raise AlignError(f"skips={self.skips!r}: must be one of {', '.join(SKIP_POLICIES)}")

    @classmethod
    def from_config(cls, cfg: LabelConfig, seed: int = 0, min_votes: int = 0) -> "ExportPolicy":
        return cls(
            ties=cfg.ties, skips=cfg.skips, drop_unsafe_chosen=cfg.drop_unsafe_chosen, seed=seed, min_votes=min_votes
        )


def _majority_flag(flags: Sequence[Optional[bool]]) -> Optional[bool]:
    yes = sum(f is True for f in flags)
    no = sum(f is False for f in flags)
    return True if yes > no else False if no > yes else None


def _median_rating(ratings: Sequence[str]) -> str:
    idx = sorted(RATINGS.index(r) for r in ratings)
    return RATINGS[idx[len(idx) // 2]]  # the upper middle index of an even count = the weaker rating


def resolve_pair(pair: dict, number: int, policy: ExportPolicy) -> tuple[Optional[dict], dict]:
    """(the preference record or None when dropped, the pair's agreement row)."""
    labels = pair["labels"]
    votes = Counter(lab["choice"] for lab in labels)
    row = {
        "pair_id": pair["id"],
        "round": number,
        "votes": {c: votes.get(c, 0) for c in ("a", "b", "tie", "skip")},
        "labelers": sorted(lab["labeler"] for lab in labels),
        "winner": None,
        "agreement": None,
        "kept": False,
        "dropped": None,
    }

    def drop(reason: str):
        row["dropped"] = reason
        return None, row

    if not labels:
        return drop("unlabeled")
    if sum(votes[c] for c in ("a", "b", "tie")) < policy.min_votes:
        return drop("incomplete")
    if policy.skips == "drop_pair" and votes["skip"]:
        return drop("skipped")
    counted = [lab for lab in labels if lab["choice"] != "skip"]
    if not counted:
        return drop("skipped")
    top = max(votes[c] for c in ("a", "b", "tie"))
    winners = [c for c in ("a", "b", "tie") if votes[c] == top]
    row["agreement"] = top / len(counted)
    if len(winners) > 1:
        return drop("no_majority")
    winner = row["winner"] = winners[0]
    a_safe = _majority_flag([lab["a_safe"] for lab in counted])
    b_safe = _majority_flag([lab["b_safe"] for lab in counted])
    if winner == "tie":
        if policy.ties == "drop":
            return drop("tie")
        chosen = random.Random(f"{policy.seed}:{pair['id']}").choice("ab")
        rating = RATINGS[-1]
    else:
        chosen = winner
        rating = _median_rating([lab["rating"] for lab in counted if lab["choice"] == winner])
    rejected = "b" if chosen == "a" else "a"
    safe = {"a": a_safe, "b": b_safe}
    if policy.drop_unsafe_chosen and safe[chosen] is False and safe[rejected] is True:
        return drop("unsafe_chosen")
    record = {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in pair["prompt"]],
        "chosen": pair[f"response_{chosen}"],
        "rejected": pair[f"response_{rejected}"],
        "rating": rating,
        "category": pair["category"],
        "chosen_safe": safe[chosen],
        "rejected_safe": safe[rejected],
        "margin": None,
        "source": f"label:round-{number}",
    }
    row["kept"] = True
    row["chosen"] = chosen
    return record, row


def resolve_round(pairs: Sequence[dict], number: int, policy: ExportPolicy) -> tuple[list[dict], list[dict], dict]:
    """(records, agreement rows, stats) of a round's pairs as `LabelStore.round_pairs` gives them."""
    from align.data.validate import BadRow, check_record

    records, rows = [], []
    gold = [p for p in pairs if p.get("gold")]
    pairs = [p for p in pairs if not p.get("gold")]
    for pair in pairs:
        record, row = resolve_pair(pair, number, policy)
        if record is not None:
            try:
                check_record(record, "preference")
            except BadRow as e:  # the store checks pairs on entry, so this is a bug, not bad data
                raise AlignError(f"round {number} pair {pair['id']}: exported record is invalid: {e}") from None
            records.append(record)
        rows.append(row)
    agreements = [r["agreement"] for r in rows if r["agreement"] is not None]
    dropped = Counter(r["dropped"] for r in rows if r["dropped"])
    stats = {
        "round": number,
        "label/pairs": len(pairs),
        "label/gold_pairs": len(gold),
        "label/kept": len(records),
        "label/labels": sum(sum(r["votes"].values()) for r in rows),
        "label/mean_agreement": sum(agreements) / len(agreements) if agreements else None,
        "label/full_agreement_share": (sum(a == 1.0 for a in agreements) / len(agreements)) if agreements else None,
    }
    for reason in ("unlabeled", "incomplete", "skipped", "no_majority", "tie", "unsafe_chosen"):
        stats[f"label/dropped/{reason}"] = dropped.get(reason, 0)
    for rating in RATINGS:
        stats[f"label/rating/{rating}"] = sum(r["rating"] == rating for r in records)
    # The recipe's safety bins (sec. 3.2.1): chosen safe / other unsafe, both safe, both unsafe.
    bins = Counter((r["chosen_safe"], r["rejected_safe"]) for r in records)
    stats["label/safety/chosen_safe_only"] = bins[(True, False)]
    stats["label/safety/both_safe"] = bins[(True, True)]
    stats["label/safety/both_unsafe"] = bins[(False, False)]
    stats["label/safety/unknown"] = sum(v for k, v in bins.items() if None in k)
    stats["policy"] = {
        "ties": policy.ties,
        "skips": policy.skips,
        "drop_unsafe_chosen": policy.drop_unsafe_chosen,
        "seed": policy.seed,
        "min_votes": policy.min_votes,
    }
    return records, rows, stats


def write_export(records: Sequence[dict], rows: Sequence[dict], stats: dict, out_dir: str | Path) -> Path:
    """Write preference.jsonl, agreement.jsonl and stats.json into ``out_dir``, atomically (the
    folder appears complete or not at all)."""
    from align.io import atomic_dir, write_json_atomic

    with atomic_dir(out_dir) as tmp:
        for name, items in ((RECORDS_FILE, records), (AGREEMENT_FILE, rows)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / STATS_FILE, stats)
    return Path(out_dir)


def export_round(store, number: int, out_dir: str | Path, policy: ExportPolicy = ExportPolicy()) -> dict:
    """Resolve round ``number`` of ``store`` and write it to ``out_dir``; return the stats."""
    records, rows, stats = resolve_round(store.round_pairs(number), number, policy)
    write_export(records, rows, stats, out_dir)
    return stats


def load_export(out_dir: str | Path, cache_dir: Optional[str | Path] = None):
    """The exported records as a `datasets.Dataset` with exactly PREFERENCE_FEATURES."""
    from datasets import load_dataset

    from align.data.load import to_dataset
    from align.data.schema import PREFERENCE_FEATURES

    path = Path(out_dir) / RECORDS_FILE
    if not path.is_file():
        raise AlignError(f"{path}: no export here; run `align label export` first")
    if path.stat().st_size == 0:
        return to_dataset([], "preference")  # the json builder cannot infer anything from an empty file
    return load_dataset(
        "json",
        data_files=str(path),
        features=PREFERENCE_FEATURES,
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
