"""Resumable training checkpoints, one format for every trainer (reward models, PPO).

A checkpoint is a directory `<root>/<prefix>-<N>` (`step-120`, `iter-5`) holding the trainer's own
files (weights, optimizer, scheduler), each rank's RNG states (`rng_rank<R>.pt`: python, numpy, torch
CPU and every CUDA device) and `state.json` (the loop's position), written last. It is written into a
temporary sibling and renamed into place once complete (`align.io.atomic_dir`), so a kill mid-write
never leaves a directory that looks finished; `list_checkpoints` also requires `state.json`. Older
checkpoints beyond `keep` are deleted after each write. The SFT-style stages keep HF Trainer's own
checkpoint files (weights, optimizer, scheduler, RNG, `trainer_state.json` last) and find them here.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from align.faults import fault
from align.io import atomic_dir, read_json, write_json_atomic
from align.launch import dist

STATE = "state.json"


def list_checkpoints(root: Path, prefix: str, state: str = STATE) -> list[Path]:
    """Complete checkpoints `<prefix>-<N>` under `root` (those holding ``state``, the file written last),
    oldest (smallest N) first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)", p.name)
        if m and p.is_dir() and (p / state).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path, prefix: str, state: str = STATE) -> Path | None:
    """The checkpoint to resume from: the newest complete one, or None. HF Trainer's checkpoints (SFT,
    rejection sampling, GAtt) are `checkpoint-<N>` with `trainer_state.json` written last."""
    found = list_checkpoints(root, prefix, state)
    return found[-1] if found else None


def rng_state() -> dict:
    """This process's RNG states: python's `random`, numpy's global generator, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved (a state without an entry leaves that generator as it is)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    name: str,
    state: dict,
    write: Callable[[Path], None],
    *,
    rank: int = 0,
    keep: int = 0,
    fault_point: str | None = None,
) -> Path:
    """Write checkpoint `root/name` atomically; every rank must call it.

    `write(dir)` writes this rank's files (its optimizer partition under ZeRO-3) into rank 0's temporary
    directory; then each rank's RNG, then rank 0 writes `state` as state.json, renames the directory into
    place and deletes all but the newest `keep` checkpoints of the same prefix (0 = keep all).
    `fault_point` names a fault-injection point between the last write and the rename.
    """
    final = root / name
    main = rank == 0
    with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
        tmp = dist.broadcast_object(tmp)
        write(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        dist.barrier()  # every rank's part written before rank 0 finishes and renames
        if main:
            write_json_atomic(tmp / STATE, state)
            if fault_point:
                fault(fault_point)
    if main and keep > 0:
        prefix = name.rpartition("-")[0]
        for old in list_checkpoints(root, prefix)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, rank: int = 0) -> dict:
    """This rank's RNG restored from checkpoint `path`; returns its state.json (the trainer loads its own
    files first, then calls this, so nothing it does while loading draws from the restored generators)."""
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return read_json(path / STATE)
