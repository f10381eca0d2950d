"""Fault injection for the kill-anywhere tests: `ALIGN_FAULT=point[:n]` SIGKILLs this process the n-th
time execution reaches `fault(point)`. Points sit where a crash hurts most: inside a checkpoint write
before its rename, between a stage's finished artifacts and its rename, after a rollout, mid-training,
between stages. Without the variable, `fault` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault(point: str) -> None:
    spec = os.environ.get("ALIGN_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
