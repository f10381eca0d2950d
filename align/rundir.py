"""Facts about a run directory: the stage instances of a config, where each one's artifacts are, its key
and status, and one line about a finished stage's manifest.

A leaf of the pipeline: align/pipeline.py, align/evaluation.py and align/report.py import it, and it
imports none of them. Layout of `runs/NAME/`: see align/pipeline.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import AlignError
from align.io import read_json

if TYPE_CHECKING:
    from align.config import PipelineConfig

MANIFEST = "manifest.json"


def instances(cfg: PipelineConfig) -> list[tuple[str, str, int]]:
    """(instance, stage, round) in run order: `stages` once (round 1), then `round_stages` in every
    round 2..rounds, named `<stage>.r<N>` (Llama 2's RLHF-V1..V5 iterations)."""
    out = [(n, n, 1) for n in cfg.stages]
    for r in range(2, cfg.rounds + 1):
        out += [(f"{n}.r{r}", n, r) for n in cfg.round_stages]
    return out


def instance(cfg: PipelineConfig, name: str) -> tuple[str, str, int]:
    """(instance, stage, round) of instance `name`."""
    for inst in instances(cfg):
        if inst[0] == name:
            return inst
    raise AlignError(f"no stage instance '{name}' in this config: {', '.join(i[0] for i in instances(cfg))}")


def latest_dir(cfg: PipelineConfig, run_dir: Path, stage: str, before: str | None = None) -> Path:
    """The directory of the latest instance of `stage` that runs before instance `before`."""
    found = run_dir / stage
    for inst, st, _ in instances(cfg):
        if inst == before:
            break
        if st == stage:
            found = run_dir / inst
    return found


def finished_before(cfg: PipelineConfig, run_dir: Path, name: str) -> dict[str, dict]:
    """Instance -> manifest of every finished instance that runs before instance `name`."""
    out = {}
    for earlier, _, _ in instances(cfg):
        if earlier == name:
            break
        m = run_dir / earlier / MANIFEST
        if m.is_file():
            out[earlier] = read_json(m)
    return out


def stage_key(cfg: PipelineConfig, name: str, run_dir: Path) -> str:
    """Hash of the stage's config, its round, and the keys of the instances before it that it may read."""
    _, stage, rnd = instance(cfg, name)
    parts = [cfg.stage_hash(stage), f"round{rnd}"]
    for earlier, _, _ in instances(cfg):
        if earlier == name:
            break
        m = run_dir / earlier / MANIFEST
        parts.append(read_json(m)["key"] if m.is_file() else f"missing:{earlier}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stage_status(cfg: PipelineConfig, name: str, run_dir: Path) -> str:
    """done (artifacts match the config) | stale (done for another config) | partial | pending."""
    m = run_dir / name / MANIFEST
    if m.is_file():
        return "done" if read_json(m).get("key") == stage_key(cfg, name, run_dir) else "stale"
    if (run_dir / ".work" / name).is_dir():
        return "partial"
    return "pending"


def one_line(m: dict) -> str:
    """A finished stage's manifest in one line: status, wall time, headline figures, checkpoint."""
    s = m.get("summary", {})
    # The headline figures only: per-level counts and gap quantiles stay in the manifest.
    keys = [
        k
        for k, v in s.items()
        if isinstance(v, (int, float)) and not any(part in k for part in ("/count/", "/gap/q", "/source/", "data/"))
    ]
    shown = ", ".join(f"{k}={_fmt(s[k])}" for k in keys[:12])
    where = s.get("model_dir") or ""
    return f"{m['status']} in {m['wall_s']:.0f}s; {shown}" + (f"; checkpoint: {where}" if where else "")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
