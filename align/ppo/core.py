"""PPO math, as pure functions of tensors (imports only torch).

Layout of every per-token tensor: (B, T), B sequences, T = the longest response of the batch; each row
is right-padded, and ``response_mask`` (True = a generated token, trained on) is a prefix of the row.
Position t holds the quantities of the action "emit response token t": log pi(a_t | s_t), V(s_t), r_t.

Where the numbers come from:
- PPO clipped surrogate: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7.
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", eq. 16 (the recursion form delta_t + gamma * lambda * A_{t+1}).
- Reward: Llama 2 (Touvron et al. 2023) sec. 3.2.3, ``R(g | p) = R~c(g | p) - beta * D_KL(pi(g|p) || pi_0(g|p))``,
  the KL spent per token as in Ziegler et al. 2019 / InstructGPT (Ouyang et al. 2022) and the score
  ``R~c`` (reward.combined.combined_reward) given on the last token.
- Estimators of KL(pi || pi_ref) from samples of pi: k1 = log pi - log pi_ref and k3 = (r - 1) - log r with
  r = pi_ref / pi (Schulman 2020, "Approximating KL Divergence"); k3 is unbiased and never negative.

Aggregation happens in ONE place, `aggregate`: a token mean over the whole mini-batch with a global
denominator (the number of trained tokens of the mini-batch on all processes), so the shards of a
mini-batch (processes, gradient-accumulation micro-batches) SUM to the mini-batch's loss and metrics.
Every loss/metric function here takes that denominator and returns partial sums of that kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# The rollout batch


@dataclass
class Trajectory:
    """One PPO iteration's batch of B sampled sequences, ready for the update.

    Shapes (P = the longest prompt, T = the longest response of the batch):
      input_ids       (B, P + T) long     prompt LEFT-padded to P, then the response RIGHT-padded to T
      attention_mask  (B, P + T) bool     True = a real token
      response_mask   (B, T) bool         True = a generated token (trained on); a prefix of each row
      logprobs        (B, T) float32      log pi_old(a_t | s_t) at the sampling temperature; 0 where masked
      ref_logprobs    (B, T) float32      log pi_ref(a_t | s_t), same temperature
      values          (B, T) float32      V_old(s_t), the value head before the update
      rewards         (B, T) float32      r_t: -beta * k1_t, plus the sequence score on the last token
      advantages      (B, T) float32      GAE advantages, whitened over the batch's response tokens
      returns         (B, T) float32      value targets: GAE advantages (before whitening) + values
      scores          (B,) float32        the sequence score R~c (whitened combined reward)

    The logits that score response token t sit at sequence position P - 1 + t.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self):
        B, T = self.response_mask.shape
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] != B or self.input_ids.shape[1] < T:
            raise ValueError(
                f"Trajectory: input_ids {tuple(self.input_ids.shape)} must be (B, P + T) with "
                f"B={B}, T={T} (response_mask {tuple(self.response_mask.shape)})"
            )
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"Trajectory: attention_mask {tuple(self.attention_mask.shape)} != input_ids "
                f"{tuple(self.input_ids.shape)}"
            )
        for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
            if getattr(self, name).shape != (B, T):
                raise ValueError(f"Trajectory: {name} {tuple(getattr(self, name).shape)} must be (B, T) = ({B}, {T})")
        if self.scores.shape != (B,):
            raise ValueError(f"Trajectory: scores {tuple(self.scores.shape)} must be (B,) = ({B},)")

    def __len__(self) -> int:
        return self.response_mask.shape[0]

    @property
    def prompt_len(self) -> int:
        """P: the prompt columns of input_ids."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, rows: torch.Tensor | Sequence[int]) -> "Trajectory":
        """The sub-batch of the given rows (same P and T)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Trajectory(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device) -> "Trajectory":
        return Trajectory(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Trajectory":
        return cls(**{f.name: state[f.name] for f in fields(cls)})


# ---------------------------------------------------------------------------------------------------
# Masking and aggregation


def aggregate(per_token: torch.Tensor, loss_mask: torch.Tensor, num_tokens: float | torch.Tensor) -> torch.Tensor:
    """Token mean with a global denominator: ``sum(per_token * loss_mask) / num_tokens``.

    THE one place losses and per-token metrics are reduced. ``num_tokens`` is the number of trained
    tokens in the whole mini-batch (all processes, all micro-batches), so the values of the shards of a
    mini-batch add up to the mini-batch's token mean, however it is split (verl/OpenRLHF "token-mean";
    a per-shard mean would weight a token by the size of its shard).

    Args:
        per_token: (B, T) values.
        loss_mask: (B, T) bool, True = counted.
        num_tokens: the global count of True in loss_mask over the mini-batch (> 0).

    Returns:
        0-dim tensor (keeps the graph of per_token).
    """
    num = float(num_tokens)
    if not num > 0:
        raise ValueError(f"aggregate: num_tokens={num_tokens} must be > 0 (a mini-batch without trained tokens)")
    return torch.where(loss_mask, per_token, torch.zeros_like(per_token)).sum() / num


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (a local mean: use `aggregate` for losses)."""
    return aggregate(x, mask, mask.sum().clamp(min=1))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the True entries of mask (Bessel-corrected when ``unbiased``)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    ss = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum()
    denom = (n - 1) if unbiased else n
    return ss / denom.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten x over the True entries of mask: ``(x - mean) / sqrt(var + eps)``; masked entries become 0.

    ``shift_mean=False`` adds the mean back (rescaled deviations around the original mean).

    Args:
        x: (B, T).
        mask: (B, T) bool.

    Returns:
        (B, T), same dtype as x.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL


def temper(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in float32 (the sampling distribution's logits); at temperature 1 the
    float32 logits themselves, without a (B, T, V) copy."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, in float32.

    Args:
        logits: (B, T, V), any float dtype (computed in float32).
        tokens: (B, T) long.

    Returns:
        (B, T) float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, ``logsumexp(z) - sum(p * z)``, in nats.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) float32.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` and `entropy_from_logits` sharing one logsumexp over the vocabulary (the
    no-grad pass over a batch's (B, T, V) logits). The log-probs are computed exactly as
    `logprobs_from_logits` computes them, so the reference's (computed by it) compare bit for bit.

    Returns:
        logprobs (B, T) and entropy (B, T), float32.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(z - lse.unsqueeze(-1))
    return picked, lse - (p * z).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(pi || pi_ref) from samples of pi: ``log pi - log pi_ref`` (B, T).

    Unbiased for the sequence KL when summed over the sampled tokens; single terms can be negative.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``(r - 1) - log r``, r = pi_ref / pi (B, T); always >= 0."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


# ---------------------------------------------------------------------------------------------------
# Rewards and advantages


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last True in a right-padded (prefix) mask; rows need >= 1 token."""
    lengths = response_mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("last_token_index: a row has no response token")
    return lengths - 1


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards, Llama 2 sec. 3.2.3: ``R = R~c - beta * KL(pi || pi_0)``.

    The KL is spent where it is incurred: ``r_t = -beta * k1_t`` on every response token, and the
    sequence's score R~c is added on its last token (Ziegler et al. 2019; InstructGPT eq. 2).

    Args:
        scores: (B,) sequence rewards R~c.
        logprobs, ref_logprobs: (B, T) log pi and log pi_0 of the sampled tokens.
        response_mask: (B, T) bool, True = a generated token.
        kl_beta: beta (recipe: 0.01 for 7B/13B).

    Returns:
        rewards: (B, T) float32, 0 where masked.
        kl: (B, T) the per-token k1, 0 where masked.
    """
    kl = torch.where(response_mask, kl_k1(logprobs, ref_logprobs), torch.zeros_like(logprobs)).float()
    rewards = -kl_beta * kl
    last = last_token_index(response_mask)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0]), last] += scores.float()
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016 eq. 16, over right-padded rows.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and ``A_t = delta_t + gamma * lam * A_{t+1}``; the
    episode ends after each row's last real token (V = 0 and A = 0 beyond it), whatever the padding holds.

    Args:
        rewards: (B, T).
        values: (B, T) V(s_t).
        response_mask: (B, T) bool prefix mask.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        advantages: (B, T) float32, 0 where masked.
        returns: (B, T) float32, ``advantages + values`` (the value targets), 0 where masked.
    """
    mask = response_mask.float()
    r = rewards.float() * mask
    v = values.float() * mask
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_adv = torch.zeros(B, dtype=r.dtype, device=r.device)
    next_value = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        a = a * mask[:, t]  # past the end: stays 0, and so is what the previous token bootstraps from
        adv[:, t] = a
        next_adv, next_value = a, v[:, t]
    returns = (adv + v) * mask
    return adv, returns


# ---------------------------------------------------------------------------------------------------
# Losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip: float,
    num_tokens: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, Schulman et al. 2017 eq. 7, negated to a loss and token-averaged.

    ``L = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)``, ``rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)``.

    Args:
        logprobs: (B, T) log pi under the current weights (with grad).
        old_logprobs: (B, T) log pi_old from the rollout.
        advantages: (B, T).
        loss_mask: (B, T) bool, True = trained on.
        clip: eps (recipe 0.2).
        num_tokens: global trained tokens of the mini-batch (see `aggregate`).

    Returns:
        loss: 0-dim.
        metrics (0-dim detached partial sums over num_tokens): ``ppo/policy_loss``, ``ppo/approx_kl``
        (k3 of pi_old against pi: ``(rho - 1) - log rho``, as CleanRL logs it), ``ppo/clipfrac``
        (share of tokens whose ratio was outside the clip range), ``ppo/ratio``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), loss_mask, num_tokens)
    with torch.no_grad():
        metrics = {
            "ppo/policy_loss": loss.detach(),
            "ppo/approx_kl": aggregate(torch.expm1(log_ratio) - log_ratio, loss_mask, num_tokens),
            "ppo/clipfrac": aggregate(((ratio - 1.0).abs() > clip).float(), loss_mask, num_tokens),
            "ppo/ratio": aggregate(ratio, loss_mask, num_tokens),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    clip: float,
    num_tokens: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017 sec. 5 uses the squared error):

    ``L_V = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, token-averaged.

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) targets.
        loss_mask: (B, T) bool.
        clip: c, in reward units.
        num_tokens: global trained tokens of the mini-batch (see `aggregate`).

    Returns:
        loss: 0-dim.
        metrics (partial sums over num_tokens): ``ppo/value_loss``, ``ppo/value_clipfrac``.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(err, err_clipped), loss_mask, num_tokens)
    with torch.no_grad():
        metrics = {
            "ppo/value_loss": loss.detach(),
            "ppo/value_clipfrac": aggregate((err_clipped > err).float(), loss_mask, num_tokens),
        }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (CleanRL's diagnostic).

    1 = the value head predicts the returns perfectly, 0 = no better than their mean, < 0 = worse.
    NaN when the returns have no variance.
    """
    var_ret = masked_var(returns, mask)
    if var_ret.item() == 0.0:
        return torch.tensor(math.nan)
    return 1.0 - masked_var(returns - values, mask) / var_ret
