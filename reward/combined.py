"""The combined PPO reward of Llama 2 (imports only torch).

Llama 2 (Touvron et al., 2023), sec. 3.2.3, "Reward":

    Rc(g | p) = Rs(g | p)  if is_safety(p) or Rs(g | p) < 0.15
                Rh(g | p)  otherwise
    R~c       = WHITEN(LOGIT(Rc))

Rs and Rh are the safety and helpfulness RM scores mapped to (0, 1) by a sigmoid; LOGIT inverts the
sigmoid. The KL penalty ``- beta * KL(pi || pi_0)`` is added by the PPO stage, not here.

Note that ``LOGIT(sigmoid(raw)) == raw``: the selection happens on the probability scale, but the
reward that reaches whitening is the chosen RM's raw score, clamped to ``|raw| <= log((1-eps)/eps)``
(13.8 for eps=1e-6) by the clamp that keeps LOGIT finite.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SAFETY_THRESHOLD = 0.15  # Llama 2 sec. 3.2.3: precision 0.89, recall 0.55 on Meta Safety test set
LOGIT_EPS = 1e-6


def logit(p: torch.Tensor, eps: float = LOGIT_EPS) -> torch.Tensor:
    """Inverse sigmoid, ``log(p / (1 - p))``, with p clamped to [eps, 1 - eps] so it is always finite.

    Args:
        p: (B,) probabilities in [0, 1].
        eps: clamp; the output lies in [-log((1-eps)/eps), +log((1-eps)/eps)].

    Returns:
        (B,) logits, same dtype as p (computed in float64: in float32, 1 - 1e-6 is not representable).
    """
    q = p.double().clamp(eps, 1.0 - eps)
    return (torch.log(q) - torch.log1p(-q)).to(p.dtype)


def combine(
    rs_raw: torch.Tensor,
    rh_raw: torch.Tensor,
    is_safety: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """Rc on the probability scale: the safety RM's score on safety prompts or likely-unsafe answers.

    Llama 2 sec. 3.2.3: ``Rc = Rs if is_safety(p) or Rs < 0.15 else Rh``, with Rs = sigmoid(rs_raw),
    Rh = sigmoid(rh_raw).

    Args:
        rs_raw: (B,) raw safety-RM scores.
        rh_raw: (B,) raw helpfulness-RM scores.
        is_safety: (B,) bool, True = the prompt is tagged as a safety prompt.
        threshold: a safety probability below this always selects the safety RM.

    Returns:
        (B,) Rc in (0, 1), float64 (float32 rounds sigmoid(17) to 1, and LOGIT could not recover it).
    """
    rs = torch.sigmoid(rs_raw.double())
    rh = torch.sigmoid(rh_raw.double())
    use_safety = safety_selected(rs_raw, is_safety, threshold)
    return torch.where(use_safety, rs, rh)


def safety_selected(rs_raw: torch.Tensor, is_safety: torch.Tensor, threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """(B,) bool, True = the combined reward takes the safety RM's score (see `combine`)."""
    return is_safety.bool() | (torch.sigmoid(rs_raw.double()) < threshold)


class RunningMoments:
    """Running mean and variance of a stream of scalars (Chan et al.'s parallel update of Welford's).

    The state is kept in float64 so millions of updates do not drift. ``std`` is the unbiased
    standard deviation; with fewer than 2 values seen it is 1.0 (there is no spread to measure yet),
    so whitening a first batch of one returns finite numbers instead of dividing by zero.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch (any shape; all elements count) into the running statistics."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = x.mean().item()
        b_m2 = ((x - b_mean) ** 2).sum().item()
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def whiten(x: torch.Tensor, moments: RunningMoments, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten with running statistics: update ``moments`` with x, then normalise x by them.

    ``shift_mean=True``: ``(x - mean) / std``. ``shift_mean=False``: ``(x - mean) / std + mean``
    (deviations rescaled, the running mean kept; TRL's convention).

    Args:
        x: (B,) values.
        moments: running statistics, updated in place with x first.
        shift_mean: subtract the running mean (see above).
        eps: added to the variance before the square root.

    Returns:
        (B,) whitened values, dtype of x.
    """
    moments.update(x)
    out = (x.double() - moments.mean) / math.sqrt(moments.var + eps)
    if not shift_mean:
        out = out + moments.mean
    return out.to(x.dtype)


_whiten = whiten  # `combined_reward` has a flag of the same name


def combined_reward(
    rs_raw: torch.Tensor,
    rh_raw: torch.Tensor,
    is_safety: torch.Tensor,
    moments: Optional[RunningMoments],
    threshold: float = SAFETY_THRESHOLD,
    whiten: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """R~c = WHITEN(LOGIT(Rc)), Llama 2 sec. 3.2.3 (the score part of the PPO reward, before the KL term).

    Args:
        rs_raw: (B,) raw safety-RM scores.
        rh_raw: (B,) raw helpfulness-RM scores.
        is_safety: (B,) bool, True = safety-tagged prompt.
        moments: running statistics of LOGIT(Rc) across PPO iterations (updated in place); may be
            None only when ``whiten`` is False.
        threshold: see `combine`.
        whiten: whiten with the running statistics (False returns LOGIT(Rc)).

    Returns:
        reward: (B,) float32.
        metrics: ``reward/safety_share`` (share of samples scored by the safety RM),
            ``reward/safety_prompt_share``, ``reward/threshold_share`` (non-safety prompts switched to
            the safety RM by the threshold), ``reward/logit_mean``, ``reward/logit_std``,
            ``reward/mean``, ``reward/running_mean``, ``reward/running_std``.
    """
    if not (rs_raw.shape == rh_raw.shape == is_safety.shape) or rs_raw.dim() != 1:
        raise ValueError(
            f"rs_raw {tuple(rs_raw.shape)}, rh_raw {tuple(rh_raw.shape)} and is_safety "
            f"{tuple(is_safety.shape)} must all be (B,)"
        )
    rc = combine(rs_raw, rh_raw, is_safety, threshold)
    lg = logit(rc)  # (B,)
    if whiten:
        if moments is None:
            raise ValueError("combined_reward(whiten=True) needs a RunningMoments")
        reward = _whiten(lg, moments, shift_mean=True)
    else:
        reward = lg
    selected = safety_selected(rs_raw, is_safety, threshold)
    safety_prompt = is_safety.bool()
    n = max(rs_raw.numel(), 1)
    metrics = {
        "reward/safety_share": selected.float().sum().item() / n,
        "reward/safety_prompt_share": safety_prompt.float().sum().item() / n,
        "reward/threshold_share": (selected & ~safety_prompt).float().sum().item() / n,
        "reward/logit_mean": lg.mean().item() if lg.numel() else 0.0,
        "reward/logit_std": lg.std().item() if lg.numel() > 1 else 0.0,
        "reward/mean": reward.mean().item() if reward.numel() else 0.0,
    }
    if moments is not None:
        metrics["reward/running_mean"] = moments.mean
        metrics["reward/running_std"] = moments.std
    return reward.float(), metrics
