"""The few collectives the PPO stage needs; each is the identity in a single process.

Every rank must call a collective at the same point with tensors of the same shape (gloo on CPU).
"""
from __future__ import annotations

from typing import Any

import torch


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled)."""
    if not initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not initialized():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor along dim 0, rank order; shapes must be equal."""
    if not initialized():
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is left as it was)."""
    if not initialized():
        return t.clone()
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not initialized():
        return t.clone()
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()
