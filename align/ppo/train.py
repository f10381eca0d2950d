"""The two halves of a PPO iteration after sampling: make the `Trajectory`, then update on it.

Both run on every rank. `make_trajectory` computes log-probs, reference log-probs and values for this
rank's contiguous share of the rows, gathers them, and then every rank derives the same rewards, GAE
advantages and whitening from the whole batch. `ppo_update` takes a whole `Trajectory` (so a test can
feed it a fixed one): each mini-batch is drawn by a permutation seeded the same on every rank, and
each rank trains on its contiguous share of it; the result does not depend on the number of processes
or micro-batches (align/ppo/core.py `aggregate`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from align.errors import AlignError
from align.launch import dist
from align.ppo import core


def build_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack prompts (left-padded to P) and responses (right-padded to T) into one tensor.

    Returns:
        input_ids (B, P + T) long, attention_mask (B, P + T) bool, response_mask (B, T) bool.
    """
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(len(r) for r in response_ids)
    if any(len(r) == 0 for r in response_ids):
        raise AlignError("a sampled response has no token; the engine must return at least one")
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.bool)
    resp = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p) : P] = torch.as_tensor(list(p))
        ids[i, P : P + len(r)] = torch.as_tensor(list(r))
        attn[i, P - len(p) : P + len(r)] = True
        resp[i, : len(r)] = True
    return ids, attn, resp


def forward_window(
    learner, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, autocast: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits and values of the response tokens of a few rows, on the columns they need.

    Columns that are padding in every row (left of the longest prompt, right of the longest response)
    are cut before the forward. Returns logits (b, Tm, V), values (b, Tm) and Tm, the longest response.
    """
    T = response_mask.shape[1]
    P = input_ids.shape[1] - T
    Tm = int(response_mask.sum(-1).max())
    left = P - int(attention_mask[:, :P].sum(-1).max())
    device = learner.device
    ids = input_ids[:, left : P + Tm].to(device)
    attn = attention_mask[:, left : P + Tm].to(device).long()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits, values = learner.module(ids, attn, P - left - 1, Tm)
    return logits, values, Tm


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (B, T) float32 of `tokens` under ``softmax(logits / temperature)``."""
    return core.logprobs_from_logits(core.temper(logits, temperature), tokens)


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy (B, T) float32 under ``softmax(logits / temperature)``."""
    return core.logprobs_and_entropy(core.temper(logits, temperature), tokens)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def vocab_fns(compiled: bool):
    """(log-probs, log-probs and entropy) over the (B, T, V) logits, torch.compiled with ``compiled``.

    Eager, each step over the vocabulary (the float32 copy, logsumexp, exp, p * z) writes a fresh
    (B, T, V) float32 tensor: 200 MB for 16 x 64 x 49,152, allocated and page-faulted anew every time.
    Measured in bench/ppo.py: 0.6-1.3 s of the 16-row log-prob pass. Compiled, inductor reads the bf16
    logits in one fused reduction and writes only (B, T). With ``compiled`` the reference's log-probs
    come from the same compiled function as the policy's, so at the first iteration (adapters still
    zero) the two agree bit for bit, as they do eager.
    """
    if not compiled:
        return token_logprobs, token_logprobs_and_entropy
    both = _compiled(token_logprobs_and_entropy)
    return _compiled(token_logprobs), both


def chunks(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def by_length(rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`rows` longest first, so the micro-batches cut from them pad little (`forward_window` trims the
    columns that are padding in every row). Which rows share a micro-batch changes no result here."""
    order = torch.argsort(attention_mask[rows].sum(-1), descending=True, stable=True)
    return rows[order]


@torch.no_grad()
def make_trajectory(
    learner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    engine_logprobs: torch.Tensor,
    scores: torch.Tensor,
    cfg,
    autocast: bool,
) -> tuple[core.Trajectory, dict[str, float]]:
    """Old and reference log-probs, values, per-token rewards, GAE and whitened advantages.

    Args:
        learner: `align.ppo.policy` learner (its weights are the policy that sampled).
        input_ids, attention_mask, response_mask: `build_batch` of the WHOLE batch (same on every rank).
        engine_logprobs: (B, T) the engine's log-probs of the sampled tokens (temperature 1), for the gap.
        scores: (B,) sequence rewards R~c.
        cfg: `PPOConfig`.
        autocast: bf16 autocast.

    Returns:
        The trajectory (whole batch, on every rank) and metrics: ``kl/ref_mean`` (mean per-sequence k1
        KL to the reference), ``kl/ref_k3_mean``, ``kl/over_bound_share``, ``ppo/entropy``,
        ``ppo/explained_variance`` (values before the update against the returns),
        ``rollout/logprob_gap`` (max |engine - trainer| log-prob over sampled tokens) and
        ``rollout/logprob_gap_mean``.
    """
    rank, world = learner.rank, learner.world_size
    B, T = response_mask.shape
    P = input_ids.shape[1] - T
    share = B // world
    mine = by_length(torch.arange(rank * share, (rank + 1) * share), attention_mask)
    temperature = cfg.sampling.temperature
    tokens = input_ids[:, P:]
    logprobs = torch.zeros(share, T)
    ref_logprobs = torch.zeros(share, T)
    values = torch.zeros(share, T)
    entropy = torch.zeros(share, T)
    gap = torch.zeros(share, T)
    learner.module.eval()
    # No activations are kept here, so the forwards take `forward_batch_size` rows, not the training
    # micro-batch: larger matrix products run nearer the CPU's bf16 peak (bench/ppo.py's phase split).
    parts = chunks(mine, cfg.forward_batch_size)
    lp_fn, lp_ent_fn = vocab_fns(cfg.compile)
    for rows in parts:
        local = rows - rank * share
        logits, v, Tm = forward_window(learner, input_ids[rows], attention_mask[rows], response_mask[rows], autocast)
        logits = logits.cpu()
        tok = tokens[rows, :Tm]
        logprobs[local, :Tm], entropy[local, :Tm] = lp_ent_fn(logits, tok, temperature)
        values[local, :Tm] = v.float().cpu()
        raw = logprobs[local, :Tm] if temperature == 1.0 else lp_fn(logits, tok, 1.0)
        gap[local, :Tm] = (raw - engine_logprobs[rows, :Tm]).abs()
        del logits
    with learner.net.reference():
        for rows in parts:
            local = rows - rank * share
            logits, _, Tm = forward_window(
                learner, input_ids[rows], attention_mask[rows], response_mask[rows], autocast
            )
            logits, tok = logits.cpu(), tokens[rows, :Tm]
            ref_logprobs[local, :Tm] = (
                lp_ent_fn(logits, tok, temperature)[0] if cfg.compile else lp_fn(logits, tok, temperature)
            )
            del logits
    # every rank now holds the whole batch
    logprobs, ref_logprobs, values, entropy, gap = (
        dist.all_gather_rows(x) for x in (logprobs, ref_logprobs, values, entropy, gap)
    )
    mask = response_mask
    zero = torch.zeros_like(logprobs)
    logprobs, ref_logprobs, values = (torch.where(mask, x, zero) for x in (logprobs, ref_logprobs, values))
    rewards, kl = core.per_token_rewards(scores, logprobs, ref_logprobs, mask, cfg.kl_beta)
    advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    traj = core.Trajectory(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        rewards=rewards,
        advantages=core.masked_whiten(advantages, mask),
        returns=returns,
        scores=scores.float(),
    )
    seq_kl = kl.sum(-1)
    k3 = torch.where(mask, core.kl_k3(logprobs, ref_logprobs), zero).sum(-1)
    gap_masked = torch.where(mask, gap, zero)
    metrics = {
        "kl/ref_mean": seq_kl.mean().item(),
        "kl/ref_k3_mean": k3.mean().item(),
        "kl/over_bound_share": (seq_kl > cfg.kl_bound).float().mean().item(),
        "ppo/entropy": core.masked_mean(entropy, mask).item(),
        "ppo/explained_variance": core.explained_variance(values, returns, mask).item(),
        "rollout/logprob_gap": gap_masked.max().item(),
        "rollout/logprob_gap_mean": core.masked_mean(gap, mask).item(),
        "ppo/advantage_mean_raw": core.masked_mean(advantages, mask).item(),
        "ppo/return_mean": core.masked_mean(returns, mask).item(),
    }
    return traj, metrics


UPDATE_METRICS = (
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/approx_kl",
    "ppo/clipfrac",
    "ppo/ratio",
    "ppo/value_clipfrac",
)


def ppo_update(
    learner, traj: core.Trajectory, cfg, seed: int, autocast: bool, iteration: int = 0, scheduler=None
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """`cfg.ppo_epochs` passes over `traj` in mini-batches of `cfg.mini_batch_size`, one optimizer step each.

    Every rank passes the same whole `traj` and `seed`. Mini-batch k of an epoch is rows
    ``perm[k*M:(k+1)*M]`` of a permutation drawn from `seed`; rank r trains on its contiguous
    ``M / world`` of them, longest first, in micro-batches of `cfg.micro_batch_size`. Losses are normalised by the
    mini-batch's token count (core.aggregate), so the steps are those of one process on the whole
    mini-batch.

    Loss per mini-batch: ``policy_loss + vf_coef * value_loss`` (core.policy_loss, core.value_loss).
    `scheduler` (the run's `align.ppo.policy.lr_scheduler`) is stepped after every mini-batch, taken or
    skipped; None leaves the optimizer's lr as it is.

    Returns:
        The mean over optimizer steps of ``ppo/*`` metrics (plus ``ppo/grad_norm``), and the per-step
        list (loss and metrics of each mini-batch, in order) for equivalence tests.
    Raises:
        AlignError naming `iteration` on a non-finite loss or gradient norm (on every rank at once);
        with ``cfg.nonfinite == "skip"`` (one process) such a mini-batch's step is skipped instead and
        counted in ``ppo/skipped_steps``.
    """
    rank, world = learner.rank, learner.world_size
    B, M = len(traj), cfg.mini_batch_size
    if B % M:
        raise AlignError(f"iteration {iteration}: {B} sequences are not a whole number of mini-batches of {M}")
    share = M // world
    P = traj.prompt_len
    temperature = cfg.sampling.temperature
    lp_fn, _ = vocab_fns(cfg.compile)
    gen = torch.Generator().manual_seed(seed)
    steps: list[dict[str, float]] = []
    skipped = 0
    learner.module.train()
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for k in range(B // M):
            rows = perm[k * M : (k + 1) * M]
            num_tokens = int(traj.response_mask[rows].sum())
            mine = by_length(rows[rank * share : (rank + 1) * share], traj.attention_mask)
            micro = chunks(mine, cfg.micro_batch_size)
            sums = torch.zeros(len(UPDATE_METRICS), dtype=torch.float64)
            norm: Optional[float] = None
            bad = False
            for j, idx in enumerate(micro):
                part = traj.select(idx)
                logits, values, Tm = forward_window(
                    learner, part.input_ids, part.attention_mask, part.response_mask, autocast
                )
                device = logits.device
                mask = part.response_mask[:, :Tm].to(device)
                logp = lp_fn(logits, part.input_ids[:, P : P + Tm].to(device), temperature)
                pl, pm = core.policy_loss(
                    logp,
                    part.logprobs[:, :Tm].to(device),
                    part.advantages[:, :Tm].to(device),
                    mask,
                    cfg.clip,
                    num_tokens,
                )
                vl, vm = core.value_loss(
                    values.float(),
                    part.values[:, :Tm].to(device),
                    part.returns[:, :Tm].to(device),
                    mask,
                    cfg.value_clip,
                    num_tokens,
                )
                loss = pl + cfg.vf_coef * vl
                # every rank learns whether ANY rank's loss is non-finite, so all raise together
                if not math.isfinite(dist.all_reduce_sum(loss.detach().float().cpu()).item()):
                    if cfg.nonfinite == "skip":  # one process (config check): drop this mini-batch's step
                        bad = True
                        learner.discard()
                        break
                    raise AlignError(
                        f"iteration {iteration}: non-finite PPO loss (epoch {_epoch + 1}, mini-batch "
                        f"{k + 1}); lower lr (now {cfg.lr}) or check the rewards"
                    )
                norm = learner.accumulate(loss, boundary=(j == len(micro) - 1))
                metrics = {**pm, **vm}
                sums += torch.tensor([float(metrics[name]) for name in UPDATE_METRICS], dtype=torch.float64)
            sums = dist.all_reduce_sum(sums)
            if scheduler is not None:
                scheduler.step()
            if cfg.nonfinite == "skip" and (bad or norm is None or not math.isfinite(norm)):
                skipped += 1  # nothing was stepped: the learner drops non-finite gradients itself
                continue
            if norm is None or not math.isfinite(norm):
                raise AlignError(
                    f"iteration {iteration}: non-finite gradient norm (epoch {_epoch + 1}, mini-batch "
                    f"{k + 1}); lower lr (now {cfg.lr})"
                )
            step = {name: sums[i].item() for i, name in enumerate(UPDATE_METRICS)}
            step["ppo/loss"] = step["ppo/policy_loss"] + cfg.vf_coef * step["ppo/value_loss"]
            step["ppo/grad_norm"] = norm
            steps.append(step)
    learner.module.eval()
    if not steps:
        raise AlignError(
            f"iteration {iteration}: every PPO step was non-finite and skipped; lower lr (now "
            f"{cfg.lr}) or check the rewards"
        )
    mean = {name: sum(s[name] for s in steps) / len(steps) for name in steps[0]}
    mean["ppo/skipped_steps"] = float(skipped)
    return mean, steps
