"""The labeling figures as people read them: `align label status` lines, the admin view's data, the
label stage's quality table (``quality.md``, which the run report shows) and its headline there.

All of them are built from `LabelStore.rounds()` rows and `agreement.round_agreement` figures.
"""

from __future__ import annotations

from pathlib import Path

from align.label.agreement import format_agreement, round_agreement

QUALITY_FILE = "quality.md"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def round_quality(store) -> list[dict]:
    """Per round: its `LabelStore.rounds()` counts (settings left out) and ``agreement``
    (`round_agreement`, None before the first label)."""
    out = []
    for r in store.rounds():
        row = {k: v for k, v in r.items() if k != "settings"}
        labeled = r["labels"] or r["skips"] or r["gold_labels"]
        row["agreement"] = round_agreement(store.round_pairs(r["round"]), r["labels_per_pair"]) if labeled else None
        out.append(row)
    return out


def round_line(r: dict) -> str:
    """``round 2: 37 of 128 pairs complete (x 2 labels); 80 labels, 3 skips; 4 gold pairs; closed``."""
    gold = f"; {r['gold_pairs']} gold pairs" if r["gold_pairs"] else ""
    return (
        f"round {r['round']}: {r['complete_pairs']} of {r['pairs']} pairs complete (x {r['labels_per_pair']} "
        f"labels); {r['labels']} labels, {r['skips']} skips{gold}{'; closed' if r['closed'] else ''}"
    )


def status_lines(store) -> list[str]:
    """What `align label status` prints: per round its progress, then its agreement figures."""
    rounds = round_quality(store)
    if not rounds:
        return ["no rounds yet"]
    lines = []
    for r in rounds:
        lines.append(round_line(r))
        if r["agreement"] is not None:
            lines += format_agreement(r["agreement"])
    return lines


def quality_table(agreement: dict) -> str:
    """A Markdown table of the round's figures per labeler, with the round's own row last."""
    head = (
        "| labeler | labels | skips | agrees with majority | gold accuracy | s per label |\n|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {name} | {r['labels']} | {r['skips']} | {_pct(r['majority_agreement'])} (n={r['compared']}) | "
        f"{_pct(r['gold_accuracy'])} (n={r['gold_labels']}) | {_num(r['seconds_per_label'], 1)} |"
        for name, r in agreement["labelers"].items()
    ]
    kappa = "Cohen's" if agreement["cohen_kappa"] is not None else "Fleiss'"
    value = agreement["cohen_kappa"] if agreement["cohen_kappa"] is not None else agreement["fleiss_kappa"]
    tail = (
        f"\n\n{kappa} kappa {_num(value)} over {agreement['kappa_pairs']} pairs; ties {_pct(agreement['tie_share'])}, "
        f"skips {_pct(agreement['skip_share'])} of {agreement['labels']} labels."
    )
    total = (
        f"| all | {sum(r['labels'] for r in agreement['labelers'].values())} | "
        f"{sum(r['skips'] for r in agreement['labelers'].values())} | {_pct(agreement['majority_agreement'])} | "
        f"{_pct(agreement['gold_accuracy'])} (n={agreement['gold_labels']}) | {_num(agreement['seconds_per_label'], 1)} |"
    )
    return "## Labelers\n\n" + head + "\n".join([*rows, total]) + tail + "\n"


def write_quality_table(agreement: dict, out_dir: Path) -> Path:
    """Write `quality_table` to ``out_dir/quality.md`` (the run report shows a stage's ``*.md``)."""
    from align.io import write_text_atomic

    path = Path(out_dir) / QUALITY_FILE
    write_text_atomic(path, quality_table(agreement))
    return path


def label_headline(s: dict) -> str:
    """The label stage's line in the run report (HTML-safe: numbers only): progress, agreement, kappa,
    gold accuracy, from its manifest summary; '' when it holds none of them."""
    if "label/pairs" not in s:
        return ""
    parts = [f"round {s.get('round', '?')}: kept {s.get('label/kept', 0)} of {s['label/pairs']} pairs"]
    if "label/complete_pairs" in s:
        parts[0] += f" ({s['label/complete_pairs']} fully labeled)"
    q = "label/quality/"
    if q + "majority_agreement" in s:
        parts.append(f"agreement with the majority {_pct(s[q + 'majority_agreement'])}")
    for name, key in (("Cohen's", "cohen_kappa"), ("Fleiss'", "fleiss_kappa")):
        if q + key in s:
            parts.append(f"{name} kappa {_num(s[q + key])} (n={s.get(q + 'kappa_pairs', 0)})")
            break
    if q + "gold_accuracy" in s:
        parts.append(f"gold accuracy {_pct(s[q + 'gold_accuracy'])} (n={s.get(q + 'gold_labels', 0)})")
    return "; ".join(parts)
