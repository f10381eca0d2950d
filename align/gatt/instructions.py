"""The GAtt instruction bank: kinds of instructions, random combinations, long and short forms.

Llama 2 sec. 3.3: instructions such as "Act as Napoleon", "Speak in French", "You enjoy tennis",
combined at random and, half the time, shortened ("Figure: Napoleon"). The bank is a YAML/JSON file
(align/gatt/instructions.yaml is the built-in one; its header documents the format) so users add
their own. Kinds with a `check` are program-checkable (align/gatt/checkers.py) and drive both the
best-of selection of answers and the recall evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from align.errors import AlignError
from align.gatt.checkers import CHECKERS, REQUIRES_TEXT, check

BUILTIN_BANK = Path(__file__).with_name("instructions.yaml")


@dataclass(frozen=True)
class Kind:
    """One kind of instruction: its long and short templates (with ``{value}``) and its values."""

    name: str
    long: str
    short: str
    values: tuple[str, ...] = ()
    check: Optional[str] = None  # a checker name in CHECKERS, None = not program-checkable
    weight: float = 1.0

    def part(self, rng: random.Random) -> "Part":
        value = rng.choice(self.values) if self.values else None
        return Part(self.name, value, self.long.format(value=value), self.short.format(value=value), self.check)


@dataclass(frozen=True)
class Part:
    """One instruction of a combination, e.g. kind ``end_with`` with value ``banana``."""

    kind: str
    value: Optional[str]
    long: str
    short: str
    check: Optional[str]

    def keeps(self, text: str) -> Optional[bool]:
        """Whether ``text`` keeps this part; None when it is not program-checkable."""
        return None if self.check is None else check(self.check, text, self.value)


@dataclass(frozen=True)
class Instruction:
    """A combination of parts, given in the long or the short form."""

    parts: tuple[Part, ...]
    shortened: bool

    @property
    def text(self) -> str:
        if self.shortened:
            return "; ".join(p.short for p in self.parts)
        return " ".join(p.long for p in self.parts)

    @property
    def checkable(self) -> bool:
        return any(p.check for p in self.parts)

    @property
    def constraints(self) -> list[tuple[str, Optional[str]]]:
        """The (check, value) of each checkable part, as `checkers.repair` takes them."""
        return [(p.check, p.value) for p in self.parts if p.check]

    def score(self, text: str) -> Optional[float]:
        """Share of the checkable parts that ``text`` keeps; None when no part is checkable."""
        kept = [p.keeps(text) for p in self.parts if p.check]
        return sum(kept) / len(kept) if kept else None

    def keeps(self, text: str) -> Optional[bool]:
        """Whether ``text`` keeps every checkable part; None when no part is checkable."""
        s = self.score(text)
        return None if s is None else s == 1.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "shortened": self.shortened,
            "parts": [
                {"kind": p.kind, "value": p.value, "long": p.long, "short": p.short, "check": p.check}
                for p in self.parts
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Instruction":
        return cls(tuple(Part(**p) for p in d["parts"]), bool(d["shortened"]))


def _conflict(parts: Sequence[Part]) -> bool:
    """An avoided letter that another part requires in the answer (e.g. avoid 'y' + end with 'goodbye')."""
    banned = [p.value.casefold() for p in parts if p.check == "avoid_letter"]
    needed = [str(p.value).casefold() for p in parts if p.check in REQUIRES_TEXT]
    return any(b in n for b in banned for n in needed)


@dataclass(frozen=True)
class InstructionBank:
    kinds: tuple[Kind, ...]
    max_parts: int = 2

    @classmethod
    def load(cls, path: str | Path = "") -> "InstructionBank":
        """The bank in a YAML or JSON file ('' = the built-in align/gatt/instructions.yaml)."""
        import yaml

        path = Path(path) if path else BUILTIN_BANK
        if not path.is_file():
            raise AlignError(
                f"gatt.instructions={str(path)!r}: no such file; give a YAML/JSON bank in the format of {BUILTIN_BANK}"
            )
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "<bank>") -> "InstructionBank":
        if not isinstance(raw, dict) or not isinstance(raw.get("kinds"), dict) or not raw["kinds"]:
            raise AlignError(f"{where}: an instruction bank needs a non-empty 'kinds:' mapping")
        unknown = set(raw) - {"kinds", "max_parts"}
        if unknown:
            raise AlignError(f"{where}: unknown key(s) {sorted(unknown)}; valid: kinds, max_parts")
        kinds = []
        for name, k in raw["kinds"].items():
            if not isinstance(k, dict):
                raise AlignError(f"{where}: kind {name!r} must be a mapping with long, short, values, check, weight")
            bad = set(k) - {"long", "short", "values", "check", "weight"}
            if bad:
                raise AlignError(
                    f"{where}: kind {name!r}: unknown key(s) {sorted(bad)}; valid: long, short, values, check, weight"
                )
            if "long" not in k or "short" not in k:
                raise AlignError(f"{where}: kind {name!r} needs both a 'long' and a 'short' form")
            values = tuple(str(v) for v in k.get("values", ()))
            templated = "{value}" in k["long"] or "{value}" in k["short"]
            if templated and not values:
                raise AlignError(f"{where}: kind {name!r} uses {{value}} but lists no values")
            if values and not templated:
                raise AlignError(f"{where}: kind {name!r} lists values but its forms have no {{value}}")
            chk = k.get("check")
            if chk is not None and chk not in CHECKERS:
                raise AlignError(f"{where}: kind {name!r}: check {chk!r} is not one of {', '.join(CHECKERS)}")
            if chk in ("end_with", "include", "avoid_letter", "max_words") and not values:
                raise AlignError(f"{where}: kind {name!r}: check {chk!r} needs values")
            if chk == "max_words" and not all(v.isdigit() for v in values):
                raise AlignError(f"{where}: kind {name!r}: max_words values must be whole numbers")
            weight = float(k.get("weight", 1.0))
            if weight < 0:
                raise AlignError(f"{where}: kind {name!r}: weight must be >= 0")
            kinds.append(Kind(name, k["long"], k["short"], values, chk, weight))
        max_parts = int(raw.get("max_parts", 2))
        if not 1 <= max_parts <= len(kinds):
            raise AlignError(f"{where}: max_parts={max_parts} must be in 1..{len(kinds)} (the number of kinds)")
        if sum(k.weight for k in kinds) <= 0:
            raise AlignError(f"{where}: every kind has weight 0")
        return cls(tuple(kinds), max_parts)

    @property
    def checkable_kinds(self) -> tuple[Kind, ...]:
        return tuple(k for k in self.kinds if k.check)

    def sample(
        self, rng: random.Random, shorten_prob: float, only: Optional[Sequence[str]] = None, max_parts: int = 0
    ) -> Instruction:
        """A random instruction: 1..max_parts kinds (the bank's, or ``max_parts`` when it is smaller and
        not 0; by weight, without replacement; of the kinds named in ``only`` when given), shortened with
        probability ``shorten_prob``. Combinations whose parts contradict each other are redrawn."""
        kinds = [k for k in self.kinds if k.weight > 0 and (only is None or k.name in only)]
        if not kinds:
            raise AlignError(f"the instruction bank has no kind of weight > 0 among {sorted(only or [])}")
        for _ in range(100):
            n_parts = rng.randint(1, min(max_parts or self.max_parts, self.max_parts, len(kinds)))
            pool, chosen = list(kinds), []
            while pool and len(chosen) < n_parts:
                k = rng.choices(pool, weights=[x.weight for x in pool])[0]
                pool.remove(k)
                chosen.append(k)
            parts = tuple(k.part(rng) for k in chosen)
            if not _conflict(parts):
                return Instruction(parts, rng.random() < shorten_prob)
        raise AlignError(
            "the instruction bank gives only contradictory combinations (an avoided letter inside a "
            "required word); change its values"
        )

    def checkable_names(self, names: Sequence[str], where: str) -> tuple[str, ...]:
        """``names`` checked to be checkable kinds of this bank (``where`` names the setting in the error);
        all the checkable kinds when empty."""
        checkable = [k.name for k in self.checkable_kinds]
        bad = [n for n in names if n not in checkable]
        if bad:
            raise AlignError(f"{where}: {bad} are not checkable kinds of the instruction bank; choose from {checkable}")
        if not checkable:
            raise AlignError(f"{where}: the instruction bank has no checkable kind (one with `check`)")
        return tuple(names) or tuple(checkable)

    def evaluation_set(self, n: int, rng: random.Random) -> list[Instruction]:
        """``n`` single checkable instructions in the long form, the checkable kinds taking turns, so
        that each is measured about equally often."""
        kinds = self.checkable_kinds
        if not kinds:
            raise AlignError("the instruction bank has no checkable kind (one with `check`): recall cannot be measured")
        return [Instruction((kinds[i % len(kinds)].part(rng),), False) for i in range(n)]
