"""Exact duplicates and train/held-out overlap: pure functions of record lists, first occurrence kept.

Only exact copies count (same text, whitespace and case included): near-duplicates are kept.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def _dump(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def prompt_key(record: dict) -> str:
    """A record's prompt as a comparable string: the ``prompt`` of a preference pair or prompt record (its
    whole conversation before the answer); for a conversation, its turns before the first assistant turn."""
    if "prompt" in record:
        return _dump(record["prompt"])
    msgs = record["messages"]
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    return _dump([{"role": m["role"], "content": m["content"]} for m in msgs[:first]])


def record_key(record: dict) -> str:
    """A record's canonical content: a conversation's messages; a preference pair's prompt, chosen and
    rejected (not its labels: the same pair rated twice is one pair); a prompt record's prompt."""
    if "messages" in record:
        return _dump(record["messages"])
    if "chosen" in record:
        return _dump([record["prompt"], record["chosen"], record["rejected"]])
    return _dump(record["prompt"])


def drop_duplicates(
    records: Iterable[T], key: Callable[[T], str] = record_key, seen: Sequence[T] = ()
) -> tuple[list[T], int]:
    """``records`` in order without those whose key an earlier one (or one of ``seen``) has, and how many went."""
    keys = {key(r) for r in seen}
    kept, dropped = [], 0
    for r in records:
        k = key(r)
        if k in keys:
            dropped += 1
            continue
        keys.add(k)
        kept.append(r)
    return kept, dropped


def drop_overlap(records: Sequence[T], other: Sequence[T], key: Callable[[T], str] = prompt_key) -> tuple[list[T], int]:
    """``records`` in order without those whose key occurs in ``other``, and how many went (held-out items
    against the training split: a prompt trained on would inflate its evaluation)."""
    keys = {key(r) for r in other}
    kept = [r for r in records if key(r) not in keys]
    return kept, len(records) - len(kept)
