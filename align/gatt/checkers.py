"""Program-checkable constraints for GAtt instructions (pure Python).

Each checker takes an answer's text and the constraint's value and says whether the answer keeps the
constraint. An empty (or whitespace-only) answer keeps none of them: saying nothing is not following
an instruction. Words are runs of letters and digits (``don't`` and ``well-known`` are one word);
punctuation, emoji and whitespace are not words.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def words(text: str) -> list[str]:
    """The words of ``text`` in order (see the module docstring)."""
    return _WORD.findall(text)


def all_capitals(text: str, value: Optional[str] = None) -> bool:
    """Every cased letter is upper case, and there is at least one letter."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def ends_with_word(text: str, value: Optional[str]) -> bool:
    """The last word is ``value`` (any case); punctuation, emoji or spaces after it are allowed."""
    ws = words(text)
    return bool(ws) and ws[-1].casefold() == str(value).casefold()


def at_most_words(text: str, value: Optional[str]) -> bool:
    """Between 1 and ``int(value)`` words."""
    return 1 <= len(words(text)) <= int(value)


def includes(text: str, value: Optional[str]) -> bool:
    """``value`` (e.g. an emoji) occurs in the answer."""
    return bool(text.strip()) and str(value) in text


def avoids_letter(text: str, value: Optional[str]) -> bool:
    """The letter ``value`` occurs nowhere, in either case, in a non-empty answer."""
    return bool(text.strip()) and str(value).casefold() not in text.casefold()


CHECKERS: dict[str, Callable[[str, Optional[str]], bool]] = {
    "capitals": all_capitals,
    "end_with": ends_with_word,
    "max_words": at_most_words,
    "include": includes,
    "avoid_letter": avoids_letter,
}

# Checkers whose value must appear in a compliant answer (an avoided letter must not be in it).
REQUIRES_TEXT = ("end_with", "include")


def check(kind: str, text: str, value: Optional[str] = None) -> bool:
    """Whether ``text`` keeps the constraint ``kind`` with ``value``."""
    if kind not in CHECKERS:
        raise KeyError(f"unknown checker {kind!r}; known: {', '.join(CHECKERS)}")
    return CHECKERS[kind](text, value)


# ---------------------------------------------------------------------------------------------------
# Repairs: the smallest edit that makes an answer keep a constraint (gatt.repair). Applied in the
# order of REPAIR_ORDER, so a later edit does not undo an earlier one: words are cut before a word is
# appended, and the letter is removed before the text is upper-cased.


def _cut_words(text: str, n: int) -> str:
    ends = [m.end() for m in _WORD.finditer(text)]
    if len(ends) <= n:
        return text
    return text[: ends[n - 1]].rstrip(",;:- ") + "."


def _drop_letter(text: str, letter: str) -> str:
    kept = [w for w in text.split() if letter.casefold() not in w.casefold()]
    return " ".join(kept)


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def complete_sentences(text: str) -> str:
    """``text`` up to the end of its last finished sentence (dropping a trailing unfinished one, as in
    an answer cut at max_new_tokens); "" when no sentence in it is finished."""
    text = text.rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else ""


def repair(text: str, constraints: list[tuple[str, Optional[str]]]) -> str:
    """Edit ``text`` so it keeps every (kind, value) constraint where a small edit can: cut to the word
    limit (one word short when a last word must be appended), drop words with a banned letter,
    upper-case, append the required last word, append the required emoji. Before appending, an
    unfinished last sentence is dropped, so the word follows a whole sentence and a repaired answer is
    no longer than the sample (a policy trained on it ends within the same token budget). An answer
    with no finished sentence (a sample cut inside code or a list) gets nothing appended: the word
    would end a fragment (measured: ``Queue(max_size=1 sunshine.``), so it stays unrepaired and the
    caller's check leaves it out of training. The caller checks the result."""
    kinds = {k for k, _ in constraints}
    out = text.strip()
    for kind, value in sorted(constraints, key=lambda kv: REPAIR_ORDER.index(kv[0])):
        if check(kind, out, value):
            continue
        if kind == "max_words":
            out = _cut_words(out, max(1, int(value) - (1 if "end_with" in kinds else 0)))
        elif kind == "avoid_letter":
            out = _drop_letter(out, value)
        elif kind == "capitals":
            out = out.upper()
        elif kind == "end_with":
            whole = complete_sentences(out)
            if out and not whole:
                continue  # a fragment: left unrepaired
            word = value.upper() if "capitals" in kinds else value[:1].upper() + value[1:]  # a sentence of its own
            out = f"{whole} {word}." if whole else f"{word}."
        elif kind == "include":
            whole = complete_sentences(out)
            if out and not whole:
                continue
            out = f"{whole} {value}" if whole else str(value)
    return out


REPAIR_ORDER = ("max_words", "avoid_letter", "capitals", "end_with", "include")
