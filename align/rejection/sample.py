"""The sampling + scoring step of a rejection-sampling round, checkpointed per batch of prompts.

Each batch of ``batch_size`` prompts gets ``sampling.n`` samples per prompt from the engine, scored by
both reward models; the scored samples are written to ``state_dir/batchNNNNN.jsonl`` in one atomic
rename. A rerun (after a kill) reads the finished batches back and asks the engine only for the
missing ones; the engine and the scorer are built lazily, so a round whose batches are all on disk
loads neither. Each batch's sampling seed derives from (seed, round, batch index) alone, so a resumed
round gives the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

from align.errors import AlignError
from align.io import write_text_atomic
from rollout.types import SamplingParams, derive_seed


class Scorer(Protocol):
    def __call__(
        self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], is_safety: Sequence[bool]
    ) -> dict[str, list]:
        """``score`` (selection score), ``helpful_score``, ``safety_score`` (raw RM scores) and
        ``safety_rm_used`` (bool), one entry per response."""


def batch_seed(seed: int, round_: int, batch: int) -> int:
    """The sampling seed of one batch: depends on nothing else, so a resumed round resamples nothing
    differently."""
    return derive_seed(derive_seed(seed, round_), batch)


def batch_path(state_dir: Path, batch: int) -> Path:
    return Path(state_dir) / f"batch{batch:05d}.jsonl"


def _read_batch(path: Path, prompt_ids: list[int], n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    got = sorted({r["prompt_id"] for r in rows})
    if got != sorted(prompt_ids) or len(rows) != n * len(prompt_ids):
        raise AlignError(
            f"{path}: holds {len(rows)} samples of prompts {got[:5]}..., expected {n} samples of "
            f"prompts {sorted(prompt_ids)[:5]}...; the stage's work directory is inconsistent: "
            f"delete {path.parent} and rerun"
        )
    return rows


def sample_and_score(
    prompts: Sequence[dict],
    get_engine: Callable[[], object],
    get_scorer: Callable[[], Scorer],
    sampling: SamplingParams,
    state_dir: Path,
    batch_size: int,
    round_: int,
    seed: int,
    desc: str = "sampling",
) -> list[dict]:
    """Sample ``sampling.n`` answers to each prompt and score them, resuming from ``state_dir``.

    Args:
        prompts: prompt records ``{"prompt_id", "prompt" (messages), "safety", "source"}``.
        get_engine: returns the rollout engine (called at most once, only if a batch is missing).
        get_scorer: returns the scorer (likewise).
        sampling: sampling params; ``seed`` is replaced per batch (see `batch_seed`).
        state_dir: where the finished batches are kept.
        batch_size: prompts per checkpointed batch.
        round_: the round (1-based), recorded in every sample and mixed into the seed.
        seed: the run's seed.

    Returns:
        ``len(prompts) * sampling.n`` sample records, grouped by prompt in input order: the prompt
        record's fields plus ``round``, ``sample``, ``response``, ``finish_reason``,
        ``response_tokens`` and the scorer's fields.
    """
    from tqdm import tqdm

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    n = sampling.n
    out: list[dict] = []
    engine = scorer = None
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False)):
        batch = list(prompts[start : start + batch_size])
        ids = [int(p["prompt_id"]) for p in batch]
        path = batch_path(state_dir, b)
        if path.is_file():
            out.extend(_read_batch(path, ids, n))
            continue
        engine = engine or get_engine()
        scorer = scorer or get_scorer()
        rollouts = engine.generate([p["prompt"] for p in batch], replace(sampling, seed=batch_seed(seed, round_, b)))
        # Rollout rows are grouped by prompt: row r answers batch[r // n] (rollout/types.py).
        msgs = [batch[r // n]["prompt"] for r in range(len(rollouts))]
        flags = [bool(batch[r // n]["safety"]) for r in range(len(rollouts))]
        scores = scorer(msgs, rollouts.texts, flags)
        rows = []
        for r in range(len(rollouts)):
            p = batch[r // n]
            rows.append(
                {
                    "prompt_id": int(p["prompt_id"]),
                    "round": round_,
                    "sample": r % n,
                    "prompt": [{"role": m["role"], "content": m["content"]} for m in p["prompt"]],
                    "safety": bool(p["safety"]),
                    "source": p.get("source", ""),
                    "response": rollouts.texts[r],
                    "finish_reason": rollouts.finish_reasons[r],
                    "response_tokens": len(rollouts.response_ids[r]),
                    **{k: (v[r] if not hasattr(v[r], "item") else v[r].item()) for k, v in scores.items()},
                }
            )
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        out.extend(rows)
    return out
