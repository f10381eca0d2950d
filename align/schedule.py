"""The learning-rate schedule of every trainer: linear warm-up, then cosine decay to a floor.

Llama 2 sec. 3.2.2 / 3.2.3: cosine down to 10% of the peak (`min_lr_ratio` 0.1), 3% warm-up. The
reward models, SFT-style stages (through HF Trainer's `create_scheduler`, align/sft.py) and PPO (constant:
no warm-up, floor 1) all step a `lr_scheduler` over `lr_factor`. One convention: no step trains at lr 0.
The first optimizer step already trains (at lr/warmup), and the cosine reaches the floor one step after
the last. (transformers' cosine schedules start the warm-up at lr 0, so their first step moves nothing:
one step in six of a 6-step run with 3% warm-up; a cosine that reaches a floor of 0 at the last step
wastes that one instead.) Importing this module imports no torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warm-up steps of a run of `total` optimizer steps: ceil(warmup_ratio * total), as HF Trainer."""
    return math.ceil(warmup_ratio * total)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warm-up over `warmup` steps: step s < warmup trains at (s + 1) / warmup of the peak, so the
    first step already trains. Then cosine decay from the peak (step `warmup`) towards `min_ratio`,
    reached at step `total` (one past the last) and kept after it, so the last step still trains with a
    floor of 0. `lr_factor(s, 0, total, 1.0)` is 1 at every step.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: "torch.optim.Optimizer", warmup: int, total: int, min_ratio: float, start: int = 0
) -> "torch.optim.lr_scheduler.LambdaLR":
    """A torch scheduler setting `optimizer`'s lr to peak * `lr_factor(step, warmup, total, min_ratio)`.

    The peak is each param group's lr when the scheduler is built (torch keeps it as `initial_lr`, which
    an optimizer state restored from a checkpoint carries). Call its `step()` after every optimizer step,
    taken or skipped. `start`: the optimizer steps already taken (a resumed run whose position is derived,
    not loaded with `load_state_dict`); its lr is then that of step `start`.
    """
    import torch

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, min_ratio), last_epoch=start - 1
    )
