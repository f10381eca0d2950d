"""Scoring samples with both reward models and the combined reward, for selection.

Llama 2 sec. 3.2.3: ``Rc = Rs if is_safety(p) or Rs < 0.15 else Rh``; PPO uses ``WHITEN(LOGIT(Rc))``.
Rejection sampling only ranks the samples of one prompt against each other (and against the kept
answers of earlier rounds), so it uses LOGIT(Rc), the combined reward BEFORE whitening: whitening
with running statistics would make a score depend on when it was computed, and the pool compares
scores across rounds. LOGIT(Rc) is the chosen RM's raw score (reward/combined.py), so scores of
the safety and helpfulness RM are compared on their raw scales, as in the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def load_reward_scorers(ctx, reward_cfg, zero3: dict | None = None) -> tuple:
    """(helpfulness, safety) `reward.model.RewardScorer`s of the stages named in ``reward_cfg`` (a
    `RewardUseConfig`), each scoring as it trained (its model/scorer.json). Used by rejection sampling and PPO.
    ``zero3``: a ZeRO-3 config to partition each over the process group (PPO's ``reward.shard``)."""
    from align.errors import AlignError
    from reward.model import RewardScorer

    def load(stage: str):
        path = Path(ctx.stage_dir(stage)) / "model"
        if not path.is_dir():
            raise AlignError(f"{ctx.name}: reward model stage '{stage}' has no model at {path}; run it first")
        return RewardScorer.from_pretrained(path, zero3=zero3)

    return load(reward_cfg.helpful_rm), load(reward_cfg.safety_rm)


class CombinedScorer:
    """Scores (prompt, response) pairs with the helpfulness and safety RMs and combines them."""

    def __init__(self, helpful, safety, threshold: float, batch_size: int):
        self.helpful = helpful  # reward.model.RewardScorer
        self.safety = safety
        self.threshold = threshold
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, ctx, reward_cfg) -> "CombinedScorer":
        """The RMs of the stages named in ``reward_cfg`` (a `RewardUseConfig`), `load_reward_scorers`."""
        helpful, safety = load_reward_scorers(ctx, reward_cfg)
        return cls(helpful, safety, reward_cfg.safety_threshold, reward_cfg.score_batch_size)

    def __call__(
        self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], is_safety: Sequence[bool]
    ) -> dict[str, list]:
        """Per response: ``score`` = LOGIT(Rc) (selection score), ``helpful_score`` and
        ``safety_score`` (raw RM scores), ``safety_rm_used`` (Rc took the safety RM)."""
        from reward.combined import combined_reward, safety_selected

        rh = self.helpful.score(prompts, responses, self.batch_size)  # (B,)
        rs = self.safety.score(prompts, responses, self.batch_size)  # (B,)
        flags = torch.tensor(list(is_safety), dtype=torch.bool)
        score, _ = combined_reward(rs, rh, flags, None, self.threshold, whiten=False)
        used = safety_selected(rs, flags, self.threshold)
        return {
            "score": score.tolist(),
            "helpful_score": rh.tolist(),
            "safety_score": rs.tolist(),
            "safety_rm_used": used.tolist(),
        }
