"""Agreement and quality of a round's labels: pure functions over `LabelStore.round_pairs` output.

- Agreement with the majority, per labeler: on each pair, the labeler's choice against the majority
  of the *other* labelers' votes (leave-one-out: counting the labeler's own vote would let two
  labelers who disagree each agree with themselves); a pair where the others have no single
  majority does not count.
- Cohen's kappa: when the round has exactly two labelers, over the pairs both of them voted on.
- Fleiss' kappa: over the pairs with exactly ``labels_per_pair`` (>= 2) votes.
- Time per label: per labeler, the median gap between the first submissions of consecutive labels,
  leaving out gaps over ``max_gap_s`` (a break, not labeling).
- Shares of ties and skips among all labels.
- Gold accuracy: on gold pairs (``pair["gold"]`` = the known better response, a | b), the share of a
  labeler's votes that pick it (a tie is a wrong answer; a skip is no vote). Gold pairs count in
  nothing else but the time per label.

Votes are the choices a | b | tie; a skip says "cannot judge", so it is no vote for agreement or kappa.
A kappa is None when it is undefined (no pairs, or chance agreement is 1: everyone used one choice).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Optional, Sequence

VOTES = ("a", "b", "tie")
MAX_GAP_S = 600.0


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> Optional[float]:
    """Cohen's kappa of two raters' categories over the same items (x[i], y[i] rate item i)."""
    if len(x) != len(y):
        raise ValueError(f"cohen_kappa: {len(x)} and {len(y)} ratings; each rater rates every item once")
    n = len(x)
    if n == 0:
        return None
    po = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    pe = sum(cx[c] * cy[c] for c in cx) / (n * n)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> Optional[float]:
    """Fleiss' kappa of ``table[i][j]`` = raters who put item i in category j; n raters per item."""
    rows = [list(r) for r in table]
    if not rows:
        return None
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows) or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("fleiss_kappa: every item needs the same number (>= 2) of ratings over the same categories")
    items = len(rows)
    p = [sum(r[j] for r in rows) / (items * n) for j in range(len(rows[0]))]
    p_bar = sum((sum(c * c for c in r) - n) / (n * (n - 1)) for r in rows) / items
    pe = sum(q * q for q in p)
    return None if pe >= 1 else (p_bar - pe) / (1 - pe)


def majority(choices: Sequence[str]) -> Optional[str]:
    """The single most frequent choice, or None (no choices, or a tie for the most)."""
    counts = Counter(choices).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def median(xs: Sequence[float]) -> Optional[float]:
    s = sorted(xs)
    if not s:
        return None
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def label_gaps(times: Sequence[str | datetime], max_gap_s: float = MAX_GAP_S) -> list[float]:
    """Seconds between consecutive label times (ISO strings or datetimes), gaps over max_gap_s left out."""
    ts = sorted(t if isinstance(t, datetime) else datetime.fromisoformat(t) for t in times)
    gaps = [(b - a).total_seconds() for a, b in zip(ts, ts[1:])]
    return [g for g in gaps if g <= max_gap_s]


def round_agreement(pairs: Sequence[dict], labels_per_pair: int, max_gap_s: float = MAX_GAP_S) -> dict:
    """Agreement and quality figures of one round (``pairs`` as `LabelStore.round_pairs` gives them).

    Returns ``{"labels", "tie_share", "skip_share", "majority_agreement", "cohen_kappa",
    "fleiss_kappa", "kappa_pairs", "seconds_per_label", "gold_pairs", "gold_labels", "gold_accuracy",
    "labelers": {name: {"labels", "skips", "compared", "majority_agreement", "gold_labels",
    "gold_accuracy", "seconds_per_label"}}}`` (shares, kappas and accuracies None when undefined).
    ``labels``, ``skips`` and the shares count the round's regular pairs only.
    """
    gold = [p for p in pairs if p.get("gold")]
    pairs = [p for p in pairs if not p.get("gold")]
    all_labels = [lab for p in pairs for lab in p["labels"]]
    per: dict[str, dict] = {}
    times: dict[str, list] = {}

    def row_of(name: str) -> dict:
        return per.setdefault(name, {"labels": 0, "skips": 0, "compared": 0, "agreed": 0, "gold": 0, "gold_ok": 0})

    for lab in all_labels:
        row_of(lab["labeler"])["skips" if lab["choice"] == "skip" else "labels"] += 1
        times.setdefault(lab["labeler"], []).append(lab["created_at"])
    for p in gold:
        for lab in p["labels"]:
            row = row_of(lab["labeler"])
            times.setdefault(lab["labeler"], []).append(lab["created_at"])
            if lab["choice"] in VOTES:
                row["gold"] += 1
                row["gold_ok"] += lab["choice"] == p["gold"]
    votes = [{lab["labeler"]: lab["choice"] for lab in p["labels"] if lab["choice"] in VOTES} for p in pairs]
    for pv in votes:
        for name, choice in pv.items():
            others = majority([c for other, c in pv.items() if other != name])
            if others is not None:
                per[name]["compared"] += 1
                per[name]["agreed"] += choice == others
    cohen = fleiss = None
    kappa_pairs = 0
    voters = sorted(name for name, row in per.items() if row["labels"])
    if len(voters) == 2:
        both = [pv for pv in votes if all(v in pv for v in voters)]
        cohen = cohen_kappa([pv[voters[0]] for pv in both], [pv[voters[1]] for pv in both])
        kappa_pairs = len(both)
    if labels_per_pair >= 2:
        full = [pv for pv in votes if len(pv) == labels_per_pair]
        fleiss = fleiss_kappa([[list(pv.values()).count(c) for c in VOTES] for pv in full])
        kappa_pairs = max(kappa_pairs, len(full))
    n = len(all_labels)
    compared = sum(r["compared"] for r in per.values())
    all_gaps = []
    labelers = {}
    for name, row in sorted(per.items()):
        gaps = label_gaps(times[name], max_gap_s)
        all_gaps += gaps
        labelers[name] = {
            "labels": row["labels"],
            "skips": row["skips"],
            "compared": row["compared"],
            "majority_agreement": row["agreed"] / row["compared"] if row["compared"] else None,
            "gold_labels": row["gold"],
            "gold_accuracy": row["gold_ok"] / row["gold"] if row["gold"] else None,
            "seconds_per_label": median(gaps),
        }
    n_gold = sum(r["gold"] for r in per.values())
    return {
        "labels": n,
        "tie_share": sum(lab["choice"] == "tie" for lab in all_labels) / n if n else None,
        "skip_share": sum(lab["choice"] == "skip" for lab in all_labels) / n if n else None,
        "majority_agreement": sum(r["agreed"] for r in per.values()) / compared if compared else None,
        "cohen_kappa": cohen,
        "fleiss_kappa": fleiss,
        "kappa_pairs": kappa_pairs,
        "seconds_per_label": median(all_gaps),
        "gold_pairs": len(gold),
        "gold_labels": n_gold,
        "gold_accuracy": sum(r["gold_ok"] for r in per.values()) / n_gold if n_gold else None,
        "labelers": labelers,
    }


def agreement_metrics(agreement: dict) -> dict:
    """`round_agreement`'s figures as flat manifest metrics (``label/quality/...``; undefined ones left out)."""
    out = {
        f"label/quality/{k}": v
        for k, v in agreement.items()
        if k != "labelers" and isinstance(v, (int, float)) and v is not None
    }
    for name, row in agreement["labelers"].items():
        for k, v in row.items():
            if v is not None:
                out[f"label/quality/labeler/{name}/{k}"] = v
    return out


def format_agreement(agreement: dict) -> list[str]:
    """Lines for `align label status`: the round's figures, then one line per labeler."""

    def f(v, pct=False, secs=False):
        return "-" if v is None else f"{100 * v:.0f}%" if pct else f"{v:.1f}" if secs else f"{v:.2f}"

    kappa = (
        f"Cohen's kappa {f(agreement['cohen_kappa'])}"
        if agreement["cohen_kappa"] is not None
        else f"Fleiss' kappa {f(agreement['fleiss_kappa'])}"
    )
    gold = agreement.get("gold_pairs")

    def on_gold(acc, n):
        return f", gold accuracy {f(acc, True)} of {n}" if gold else ""

    lines = [
        f"  agreement with the majority {f(agreement['majority_agreement'], True)}, {kappa} "
        f"({agreement['kappa_pairs']} pairs); ties {f(agreement['tie_share'], True)}, "
        f"skips {f(agreement['skip_share'], True)}; {f(agreement['seconds_per_label'], secs=True)} s per label"
        + on_gold(agreement.get("gold_accuracy"), agreement.get("gold_labels"))
    ]
    for name, row in agreement["labelers"].items():
        lines.append(
            f"    {name}: {row['labels']} labels, {row['skips']} skips, agrees with the others' majority "
            f"{f(row['majority_agreement'], True)} of {row['compared']}"
            + on_gold(row.get("gold_accuracy"), row.get("gold_labels"))
            + f", {f(row['seconds_per_label'], secs=True)} s per label"
        )
    return lines
