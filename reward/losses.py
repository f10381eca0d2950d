"""Reward-model losses and metrics: pure functions of tensors (imports only torch).

Every loss returns ``(loss, metrics)``: ``loss`` a 0-dim tensor that carries the gradient, ``metrics``
a dict of namespaced Python floats (``rm/...``).

Aggregation happens in one place: each loss sums its per-example terms and divides by ``denom``,
which defaults to the number of terms (the mean). A training loop that splits an optimizer step into
micro-batches passes the number of terms in the WHOLE step as ``denom``, so the summed micro-batch
losses equal the loss of the full batch whatever the split (tested in tests/reward/test_losses.py).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

# The recipe's 4 rating levels, strongest first (Llama 2 sec. 3.2.1). Must equal
# `align.data.schema.RATINGS` (checked by a test); repeated here because this module imports only torch.
RATING_LEVELS = ("significantly_better", "better", "slightly_better", "negligibly_better")

# Margin m(r) per rating level, in RATING_LEVELS order: Llama 2 (Touvron et al., 2023), Table 27.
MARGIN_TABLES: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}

MarginTable = Union[str, Sequence[float]]


def margin_table(table: MarginTable) -> tuple[float, float, float, float]:
    """The 4 margins of a named table (``none`` | ``small`` | ``large``) or of a custom sequence.

    A custom table lists 4 margins, strongest rating first (the RATING_LEVELS order).
    """
    if isinstance(table, str):
        if table not in MARGIN_TABLES:
            raise ValueError(f"margin table {table!r}: must be one of {', '.join(MARGIN_TABLES)} or 4 numbers")
        return MARGIN_TABLES[table]
    values = tuple(float(v) for v in table)
    if len(values) != len(RATING_LEVELS):
        raise ValueError(f"custom margin table {values}: needs {len(RATING_LEVELS)} margins, strongest rating first")
    return values  # type: ignore[return-value]


def margins_for(ratings_idx: torch.Tensor, table: MarginTable) -> torch.Tensor:
    """Margin m(r) of each pair from its rating index.

    Args:
        ratings_idx: (B,) long, index into RATING_LEVELS (0 = significantly better).
        table: a name in MARGIN_TABLES or 4 custom margins, strongest rating first.

    Returns:
        (B,) float32 margins (Llama 2, Table 27).
    """
    values = torch.tensor(margin_table(table), dtype=torch.float32, device=ratings_idx.device)
    return values[ratings_idx.long()]


def _denominator(n: int, denom: Optional[float]) -> float:
    if denom is None:
        return float(max(n, 1))
    if denom <= 0:
        raise ValueError(f"denom={denom}: must be > 0 (the number of terms in the whole optimizer step)")
    return float(denom)


def ranking_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    denom: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary ranking loss with a rating-dependent margin.

    Llama 2 (Touvron et al., 2023), sec. 3.2.2, eq. 2:
    ``L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r)))``, computed as ``-logsigmoid(...)``, which is
    finite for any finite input (no ``log(0)`` when the gap is very negative).

    Args:
        r_chosen: (B,) raw scalar rewards of the chosen responses.
        r_rejected: (B,) raw scalar rewards of the rejected responses.
        margin: (B,) margins m(r) (see `margins_for`); None = no margin.
        denom: divide the summed per-pair losses by this (default B: the mean). Pass the number of
            pairs in the whole optimizer step when accumulating over micro-batches.

    Returns:
        loss: 0-dim tensor.
        metrics: ``rm/ranking_loss`` (this call's mean per pair), ``rm/accuracy`` (share of pairs with
            r_c > r_r; ties count as wrong), ``rm/margin_mean`` (mean m), ``rm/reward_gap`` (mean
            r_c - r_r), ``rm/chosen_reward``, ``rm/rejected_reward`` (means).
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must both be (B,)")
    gap = r_chosen.float() - r_rejected.float()  # (B,)
    m = torch.zeros_like(gap) if margin is None else margin.to(gap)
    per_pair = -F.logsigmoid(gap - m)  # (B,)
    loss = per_pair.sum() / _denominator(per_pair.numel(), denom)
    with torch.no_grad():
        metrics = {
            "rm/ranking_loss": per_pair.mean().item() if per_pair.numel() else 0.0,
            "rm/accuracy": (gap > 0).float().mean().item() if gap.numel() else 0.0,
            "rm/margin_mean": m.mean().item() if m.numel() else 0.0,
            "rm/reward_gap": gap.mean().item() if gap.numel() else 0.0,
            "rm/chosen_reward": r_chosen.float().mean().item() if gap.numel() else 0.0,
            "rm/rejected_reward": r_rejected.float().mean().item() if gap.numel() else 0.0,
        }
    return loss, metrics


def safety_aux_loss(
    rewards: torch.Tensor,
    is_safe: torch.Tensor,
    label_mask: torch.Tensor,
    denom: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Safety auxiliary loss on per-response safety labels: a binary safe/unsafe term at threshold 0.

    Llama 2 (Touvron et al., 2023), sec. 3.2.2 and Table 29, name a "safety auxiliary loss" for the
    Safety RM and measure it by the recall of unsafe responses "captured with a reward score threshold
    of 0.5 (i.e., negative values before Sigmoid)"; the paper gives no formula. We implement the
    binary cross-entropy that this measurement implies, treating ``sigmoid(r)`` as P(safe):

        safe response:   -log(sigmoid(r))      (pushes r above 0)
        unsafe response: -log(sigmoid(-r))     (pushes r below 0)

    i.e. ``-logsigmoid(s * r)`` with ``s = +1`` for safe and ``-1`` for unsafe; responses whose label
    is unknown (``label_mask`` False) contribute nothing. The ranking loss is unchanged; the caller
    adds ``weight * aux``. Apply it to chosen and rejected responses alike (concatenate them).

    Args:
        rewards: (N,) raw scalar rewards.
        is_safe: (N,) bool, the safety label (read only where ``label_mask`` is True).
        label_mask: (N,) bool, True = the response has a safety label.
        denom: divide the summed terms by this (default: the number of labelled responses, or 1
            when there are none, which gives a zero loss that still carries a graph).

    Returns:
        loss: 0-dim tensor.
        metrics: ``rm/safety_aux_loss`` (this call's mean per labelled response), ``rm/unsafe_recall``
            (share of labelled-unsafe responses with r < 0, the Table 29 measure; 0 when there are
            none), ``rm/safety_labelled`` and ``rm/unsafe_count`` (counts).
    """
    if not (rewards.shape == is_safe.shape == label_mask.shape) or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, is_safe {tuple(is_safe.shape)} and label_mask "
            f"{tuple(label_mask.shape)} must all be (N,)"
        )
    r = rewards.float()
    known = label_mask.bool()
    sign = torch.where(is_safe.bool(), 1.0, -1.0).to(r)  # (N,)
    per_resp = -F.logsigmoid(sign * r) * known.to(r)  # (N,), 0 where unknown
    n_known = int(known.sum().item())
    loss = per_resp.sum() / _denominator(n_known, denom)
    with torch.no_grad():
        unsafe = known & ~is_safe.bool()
        n_unsafe = int(unsafe.sum().item())
        metrics = {
            "rm/safety_aux_loss": (per_resp.sum() / max(n_known, 1)).item(),
            "rm/unsafe_recall": ((r < 0) & unsafe).sum().item() / n_unsafe if n_unsafe else 0.0,
            "rm/safety_labelled": float(n_known),
            "rm/unsafe_count": float(n_unsafe),
        }
    return loss, metrics


def accuracy_by_level(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    rating_idx: torch.Tensor,
) -> dict[str, float]:
    """Pairwise accuracy overall and per rating level (the layout of Llama 2, Table 28).

    A pair counts as correct when r_c > r_r (a tie is wrong: the RM did not separate the pair).

    Args:
        r_chosen: (B,) rewards of the chosen responses.
        r_rejected: (B,) rewards of the rejected responses.
        rating_idx: (B,) long, index into RATING_LEVELS.

    Returns:
        ``rm/accuracy`` over all pairs and ``rm/accuracy/<level>`` for each level that has at least
        one pair (absent levels are left out rather than reported as NaN), plus ``rm/count/<level>``.
    """
    correct = r_chosen.float() > r_rejected.float()  # (B,)
    out = {"rm/accuracy": correct.float().mean().item() if correct.numel() else 0.0}
    idx = rating_idx.long()
    for i, name in enumerate(RATING_LEVELS):
        sel = idx == i
        n = int(sel.sum().item())
        if n:
            out[f"rm/accuracy/{name}"] = correct[sel].float().mean().item()
            out[f"rm/count/{name}"] = float(n)
    return out
