"""The learning-rate schedule of every trainer: linear warm-up, then cosine decay to a floor.

Llama 2 sec. 3.2.2 / 3.2.3: cosine down to 10% of the peak (`min_lr_ratio` 0.1), 3% warm-up. The
reward models, SFT (through HF Trainer's `create_scheduler`) and PPO (constant: no warm-up, floor 1)
all take their multiplier of the peak lr from `lr_factor`. Pure Python: no torch.
"""

from __future__ import annotations

import math


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warm-up steps of a run of `total` optimizer steps: ceil(warmup_ratio * total), as HF Trainer."""
    return math.ceil(warmup_ratio * total)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, *, zero_first_step: bool = False) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warm-up over `warmup` steps, then cosine decay from the peak (step `warmup`) to `min_ratio`:
    reached at the last step (`total - 1`). The first step already trains, at lr/warmup.

    `zero_first_step`: transformers' convention (`get_cosine_schedule_with_warmup`,
    `cosine_with_min_lr`), kept by SFT-style stages so their shipped runs are unchanged: the warm-up
    starts at 0 (the first step does not move the weights when `warmup > 0`) and the cosine would reach
    `min_ratio` one step after the last (step `total`).
    """
    shift, end = (0, total) if zero_first_step else (1, total - 1)
    if step < warmup:
        return (step + shift) / warmup
    progress = min(1.0, (step - warmup) / max(1, end - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
