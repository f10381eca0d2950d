"""GAtt's evaluation: how often the policy still keeps a first-turn instruction at later turns.

Llama 2 Table 30: the share of answers that keep the attribute at turns 2 / 4 / 6 / 20, without and
with GAtt. Here the instruction is a single program-checkable constraint (align/gatt/checkers.py)
given in the first user turn only; the policy answers every turn itself (its own earlier answers are
the context), and each answer is checked. A dialogue whose next prompt does not fit the engine's
context ends there, so the counts ``n`` can fall with the turn; a turn no dialogue reaches is
reported as None ("context too short").
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

from align.gatt.instructions import Instruction


def recall_by_turn(instructions: Sequence[Instruction], answers: Sequence[Sequence[str]], max_turn: int) -> dict:
    """Share of answers keeping their dialogue's instruction, at every turn 1..max_turn, overall and per kind.

    Returns:
        ``{"overall": {turn: {"recall": float | None, "n": int}}, "by_kind": {kind: {turn: {...}}}}``
        (turns as ints; recall None where no dialogue reached the turn).
    """

    def table(rows):
        out = {}
        for t in range(1, max_turn + 1):
            kept = [inst.keeps(ans[t - 1]) for inst, ans in rows if len(ans) >= t]
            out[t] = {"recall": statistics.fmean(kept) if kept else None, "n": len(kept)}
        return out

    rows = [(inst, ans) for inst, ans in zip(instructions, answers) if inst.checkable]
    kinds = sorted({inst.parts[0].kind for inst, _ in rows})
    return {
        "overall": table(rows),
        "by_kind": {k: table([(i, a) for i, a in rows if i.parts[0].kind == k]) for k in kinds},
    }


def _pct(x: Optional[float]) -> str:
    return "n/a (context)" if x is None else f"{100 * x:.0f}%"


def _pct_ci(cell: dict) -> str:
    """``28% [24, 33] (n=200)``: a recall with its Wilson interval."""
    from align.stats import wilson

    if cell["recall"] is None:
        return _pct(None)
    lo, hi = wilson(min(cell["n"], cell["recall"] * cell["n"]), cell["n"])
    return f"{_pct(cell['recall'])} [{lo * 100:.0f}, {hi * 100:.0f}] (n={cell['n']})"


def markdown_table(before: dict, after: dict, turns: Sequence[int]) -> str:
    """Recipe Table 30's layout: rows before / after GAtt, columns the measured turns; then per kind."""
    head = "| | " + " | ".join(f"Turn {t}" for t in turns) + " |\n|---|" + "---|" * len(turns) + "\n"
    lines = [
        "# Ghost Attention: instruction kept at later turns",
        "",
        "Share of answers that keep the first-turn instruction (program-checked), Llama 2 Table 30 layout.",
        "",
        head.rstrip("\n"),
    ]
    for name, res in (("Before GAtt", before), ("After GAtt", after)):
        lines.append(f"| {name} | " + " | ".join(_pct_ci(res["overall"][t]) for t in turns) + " |")
    lines += ["", "Each cell: recall [Wilson 95% interval] (n answers)."]
    lines += [
        "",
        "Per constraint kind (before -> after; n = answers that reached the turn: held-out dialogues x eval_repeats):",
        "",
        head.rstrip("\n"),
    ]
    for kind in sorted(after["by_kind"]):
        cells = []
        for t in turns:
            b, a = before["by_kind"][kind][t], after["by_kind"][kind][t]
            cells.append(f"{_pct(b['recall'])} -> {_pct(a['recall'])} (n={a['n']})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
