"""The few collectives the multi-process stages need (reward models, PPO); each is the identity in a
single process.

Every rank must call a collective at the same point with tensors of the same shape (gloo on CPU).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the world (1 when torch.distributed is not initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    src = t.contiguous().to(device)
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src)
    return torch.cat(parts, dim=0).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is left as it was)."""
    if not initialized():
        return t.clone()
    import torch.distributed as dist

    out = t.detach().clone()
    # NCCL (GPUs) reduces only CUDA tensors; gloo (CPU) takes these as they are
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else out.device
    moved = out.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(out.device)


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def wait_for_file(path: str | Path, poll_s: float = 1.0) -> None:
    """Block until `path` exists: how the other ranks wait for what rank 0 alone makes (the engine's
    samples, written atomically into the stage's work directory).

    Not a collective: sampling at scale outlasts the process group's timeout (DeepSpeed's default is 10
    minutes), a file can be waited on for as long as it takes. If rank 0 fails instead, the launcher
    (torchrun's agent under `accelerate launch`) ends the ranks still waiting."""
    path = Path(path)
    while not path.exists():
        time.sleep(poll_s)
