"""The pipeline runner: config -> stage -> artifacts in the run directory -> next stage.

Layout of `runs/NAME/`:
    run.json                 the resolved config of the last `align run`
    <stage>/                 a finished stage's artifacts; it appears only when complete (atomic rename)
        manifest.json        status, key (config + input hash), inputs, metrics summary, wall time
        model/               HF checkpoint (policy stages) that loads with from_pretrained
        metrics.jsonl, tb/   the stage's logged metrics
    .work/<stage>/           an unfinished stage's state: checkpoints to resume from, partial outputs

A stage is skipped when its manifest's key matches the current one; the key hashes the stage's config
section, the model, the seed and the keys of the stages it reads, so a change reruns that stage and
everything after it. A stage is resumed from `.work/<stage>/` when that holds state for the same key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import PipelineConfig, pipeline_config_class
from align.configlib import ConfigError, build, init_dict, to_dict
from align.errors import AlignError, LabelingPending
from align.faults import fault
from align.io import MetricsLogger, fsync_dir, is_disk_full, read_json, read_metrics, write_json_atomic
from align.launch import write_launch_files
from align.models import load_tokenizer, resolve_model_dir
from align.precision import slow_bf16_warning
from align.report import build_report
from align.rundir import (
    MANIFEST,
    finished_before,
    instance,
    instances,
    latest_dir,
    one_line,
    stage_key,
    stage_status,
)
from align.stages import STAGES


@dataclass
class StageContext:
    """What a stage function gets: its config, where to read and where to write."""

    cfg: PipelineConfig
    name: str  # the instance: the stage name in round 1, `<stage>.r<N>` in round N
    key: str
    run_dir: Path
    work_dir: Path  # resumable state; survives a kill, wiped when the key changes
    out_dir: Path  # artifacts; moved to run_dir/<name> when the stage returns
    init_model_dir: Path  # the model this stage starts from (base or an earlier stage's model/)
    inputs: dict = field(default_factory=dict)  # name -> manifest of every earlier finished stage
    rank: int = 0
    world_size: int = 1
    stage: str = ""  # the config section (rm_helpful for rm_helpful.r2)
    round: int = 1
    wait_s: float | None = None  # a stage waiting on people (label, judge people) polls this long; None = stops

    @property
    def stage_cfg(self) -> Any:
        """This stage's config section (an `SFTConfig` for sft, a `RewardConfig` for rm_helpful, ...)."""
        return self.cfg.stage(self.stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stage_dir(self, name: str) -> Path:
        """The artifacts of the latest instance of stage `name` before this one (round-aware)."""
        return latest_dir(self.cfg, self.run_dir, name, before=self.name)

    def earlier(self, stage: str) -> list[Path]:
        """Directories of every earlier instance of `stage` (all rounds so far), oldest first."""
        out = []
        for inst, st, _ in instances(self.cfg):
            if inst == self.name:
                break
            if st == stage:
                out.append(self.run_dir / inst)
        return out

    def logger(self) -> MetricsLogger:
        return MetricsLogger(self.work_dir / "logs", tensorboard=self.is_main)


def init_model_dir(cfg: PipelineConfig, name: str, run_dir: Path) -> Path:
    init = getattr(cfg.stage(instance(cfg, name)[1]), "init", "base")
    if init == "base":
        return resolve_model_dir(cfg.model)
    model = latest_dir(cfg, run_dir, init, before=name) / "model"
    if not (model.parent / MANIFEST).is_file() or not model.is_dir():
        raise AlignError(
            f"stage '{name}' starts from stage '{init}', which has not finished: "
            f"run `align run` (or `align stage {init} CONFIG`) first"
        )
    return model


def prepare(cfg: PipelineConfig, name: str, rank: int = 0, world_size: int = 1) -> StageContext:
    run_dir = Path(cfg.run_dir)
    key = stage_key(cfg, name, run_dir)
    work = run_dir / ".work" / name
    if rank == 0:
        key_file = work / "key"
        if work.is_dir() and (not key_file.is_file() or key_file.read_text().strip() != key):
            # State from another config: resuming from it would mix two runs.
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        # Temporary siblings of atomic writes cut short by a kill: never complete, never resumed from.
        for tmp in list(work.glob(".*.tmp*")) + list(work.glob("*/.*.tmp*")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
    inputs = finished_before(cfg, run_dir, name)
    _, stage, rnd = instance(cfg, name)
    return StageContext(
        cfg=cfg,
        name=name,
        key=key,
        run_dir=run_dir,
        work_dir=work,
        out_dir=work / "out",
        init_model_dir=init_model_dir(cfg, name, run_dir),
        inputs=inputs,
        rank=rank,
        world_size=world_size,
        stage=stage,
        round=rnd,
    )


def finalize(ctx: StageContext, summary: dict, wall_s: float) -> dict:
    """Write the manifest, then move the stage's artifacts into place in one rename."""
    logs = ctx.work_dir / "logs"
    if logs.is_dir():
        shutil.copytree(logs, ctx.out_dir, dirs_exist_ok=True)
    manifest = {
        "stage": ctx.name,
        "round": ctx.round,
        "kind": STAGES[ctx.stage].kind,
        "status": "done",
        "key": ctx.key,
        "config": to_dict(ctx.stage_cfg),
        "inputs": {k: v["key"] for k, v in ctx.inputs.items()},
        "init_model": str(ctx.init_model_dir),
        "precision": ctx.cfg.compute.as_dict(),
        "summary": summary,
        "wall_s": round(wall_s, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(ctx.out_dir / MANIFEST, manifest)
    fault("finalize")  # artifacts and manifest written, not yet moved into place
    final = ctx.run_dir / ctx.name
    old = ctx.run_dir / f".{ctx.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(ctx.out_dir, final)
    fsync_dir(ctx.run_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    return manifest


def _num_processes(cfg: PipelineConfig, name: str) -> int:
    stage = cfg.stage(instance(cfg, name)[1])
    if hasattr(stage, "num_processes"):
        return stage.num_processes
    train = getattr(stage, "train", None)
    return train.num_processes if train is not None else 1


def run_stage(
    cfg: PipelineConfig, name: str, config_path: str | None = None, overrides: tuple = (), wait_s: float | None = None
) -> dict:
    """Run one stage to completion (resuming if it can) and return its manifest; ``wait_s``: see
    `StageContext.wait_s`."""
    t0 = time.time()
    n = _num_processes(cfg, name)
    with disk_full_as_error(name, Path(cfg.run_dir)):
        if n > 1:
            if config_path is None:
                raise AlignError(f"stage '{name}' runs on {n} processes and needs its config file path")
            ctx = prepare(cfg, name)
            launch_workers(ctx, config_path, overrides, n)
            summary = read_json(ctx.work_dir / "summary.json")
        else:
            ctx = prepare(cfg, name)
            ctx.wait_s = wait_s
            summary = STAGES[ctx.stage].run_function()(ctx)
        return finalize(ctx, summary, time.time() - t0)


@contextlib.contextmanager
def disk_full_as_error(name: str, run_dir: Path):
    """A write that fails on a full disk becomes one AlignError that says what to do. Nothing half
    written is taken for finished: artifacts and checkpoints are renamed into place only once complete."""
    try:
        yield
    except AlignError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise AlignError(
            f"disk full while stage '{name}' was writing under {run_dir} ({type(e).__name__}: {e}). "
            f"Free space there (check with `df -h {run_dir}`; old runs and .work/*/checkpoints are the "
            f"big items) or move the run with run_dir=PATH, then rerun the same command: finished "
            f"stages and complete checkpoints are kept, the partial write was discarded"
        ) from e


def run_worker(cfg: PipelineConfig, name: str) -> None:
    """Body of one rank under `accelerate launch`: run the stage; rank 0 leaves the summary for the parent."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with disk_full_as_error(name, Path(cfg.run_dir)):
        ctx = prepare(cfg, name, rank=rank, world_size=world)
        summary = STAGES[ctx.stage].run_function()(ctx)
        if rank == 0:
            write_json_atomic(ctx.work_dir / "summary.json", summary)
    leave_together(ctx.work_dir / "summary.json")


def leave_together(done: Path) -> None:
    """Every rank waits for rank 0's `done` file, then the group is torn down on all ranks at once.

    A rank that exited while rank 0 still worked alone (SFT's held-out pass, an engine's evaluation)
    tore down its gloo group mid-flight and aborted ("terminate called without an active exception").
    The wait is on a file, not a collective: rank 0's solo work can outlast the group's timeout."""
    import torch.distributed as dist

    from align.launch.dist import barrier, initialized, wait_for_file

    if not initialized():
        return
    wait_for_file(done)
    barrier()
    dist.destroy_process_group()


def launch_workers(ctx: StageContext, config_path: str, overrides: tuple, n: int) -> None:
    """Run the stage on n processes with accelerate + DeepSpeed ZeRO-3 (gloo on CPU)."""
    acc_yaml = write_launch_files(ctx.work_dir / "launch", n, getattr(ctx.stage_cfg, "train", None))
    (ctx.work_dir / "summary.json").unlink(missing_ok=True)  # the ranks leave when this run's is written
    name = ctx.name
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(acc_yaml),
        "-m",
        "align.cli",
        "worker",
        name,
        str(config_path),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or n) // n))}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or an error here: take the launcher and every rank down with us, no orphans.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    if rc != 0:
        raise AlignError(
            f"stage '{name}' failed on {n} processes (exit code {rc}); its log is above. "
            f"Rerun `align run` to resume from the last checkpoint once the cause is fixed"
        )


def preflight(cfg: PipelineConfig, names: list[str]) -> None:
    """Check the inputs of the stages about to run before anything is written: the base model (weights,
    chat template) and every dataset (file present, every row valid under data.bad_rows). A bad input
    then fails in seconds with one message, not hours into a run, and leaves the run directory as it was.
    """
    from align.data.load import load_records  # datasets: not loaded by `align status` or `align report`

    load_tokenizer(resolve_model_dir(cfg.model))
    for name in dict.fromkeys(instance(cfg, n)[1] for n in names):
        stage = cfg.stage(name)
        for field_name, kind in STAGES[name].data_fields.items():
            for spec in getattr(stage, field_name):
                load_records(spec, kind, Path(cfg.data_dir), cfg.data.bad_rows, cfg.seed)


def run_pipeline(
    cfg: PipelineConfig,
    config_path: str | None = None,
    overrides: tuple = (),
    only: str | None = None,
    wait_s: float | None = None,
) -> list[dict]:
    """Run every stage in order, skipping finished ones; returns their manifests.

    Raises `LabelingPending` when a label stage labeled by people finds its round incomplete (after
    waiting ``wait_s`` seconds, if given): the stages before it are done, it and the rest are not."""
    run_dir = Path(cfg.run_dir)
    names = [i[0] for i in instances(cfg)]
    todo = [n for n in names if (only is None or n == only) and stage_status(cfg, n, run_dir) != "done"]
    preflight(cfg, todo)
    announce_precision(cfg)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / "run.json",
        {
            "config": init_dict(cfg),
            "config_path": config_path,
            "overrides": list(overrides),
            "precision": cfg.compute.as_dict(),
        },
    )
    manifests = []
    for name in names:
        if only is not None and name != only:
            continue
        status = stage_status(cfg, name, run_dir)
        if status == "done":
            m = read_json(run_dir / name / MANIFEST)
            print(f"[align] {name}: done already (key {m['key']}), skipped", flush=True)
        else:
            verb = {"partial": "resuming", "stale": "config or inputs changed, rerunning"}.get(status, "starting")
            print(f"[align] {name}: {verb}", flush=True)
            try:
                m = run_stage(cfg, name, config_path, overrides, wait_s)
            except LabelingPending:
                raise  # not a failure: the round stays in the store and the stage's work directory stays
            except (AlignError, ConfigError) as e:
                work = run_dir / ".work" / name
                if work.is_dir():  # kept for `align status` and the next run
                    write_json_atomic(work / "failed.json", {"error": str(e), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
                _drop_if_nothing_to_resume(work)
                if created and not work.is_dir() and not any((run_dir / n / MANIFEST).is_file() for n in names):
                    shutil.rmtree(run_dir, ignore_errors=True)  # this call made it, nothing to resume: no trace
                raise
        manifests.append(m)
        print(f"[align] {name}: {one_line(m)}", flush=True)
        fault("between_stages")
    if only is None:
        print(f"[align] report: {build_report(run_dir, names)}", flush=True)
    return manifests


def announce_precision(cfg: PipelineConfig) -> None:
    """Print the run's precision and why, once; warn when bf16 is forced where it is only emulated."""
    print(f"[align] {cfg.compute.line()}", flush=True)
    warning = slow_bf16_warning(cfg.compute)
    if warning:
        print(f"[align] {warning}", flush=True)


def _drop_if_nothing_to_resume(work: Path) -> None:
    """A stage that failed before its first checkpoint leaves nothing worth keeping."""
    if not work.is_dir():
        return
    scratch = {"key", "out", "launch", "logs", "failed.json"}
    resumable = [p for p in work.iterdir() if p.name not in scratch and (p.is_file() or any(p.iterdir()))]
    if not resumable:
        shutil.rmtree(work, ignore_errors=True)


def status_table(cfg: PipelineConfig) -> str:
    run_dir = Path(cfg.run_dir)
    lines = [f"run {run_dir}"]
    for name, _, _ in instances(cfg):
        st = stage_status(cfg, name, run_dir)
        extra = ""
        if st in ("done", "stale"):
            extra = one_line(read_json(run_dir / name / MANIFEST))
        elif st == "partial":
            ckpts = sorted((run_dir / ".work" / name).glob("checkpoints/*"))
            rows = read_metrics(run_dir / ".work" / name / "logs" / "metrics.jsonl")
            extra = f"{len(ckpts)} checkpoint(s), last logged step {rows[-1]['step'] if rows else '-'}"
            pending = run_dir / ".work" / name / "pending.json"
            if pending.is_file():
                extra = f"waiting on labelers: {read_json(pending)['message']}"
            failed = run_dir / ".work" / name / "failed.json"
            if failed.is_file():
                extra += f"; last attempt failed: {read_json(failed)['error']}"
        lines.append(f"  {name:<20} {st:<8} {extra}")
    return "\n".join(lines)


def load_run(run_dir: str | Path) -> PipelineConfig:
    """The config a run directory was last run with (from its run.json)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise AlignError(f"{run_dir}: no run.json; not a run directory (runs are under runs/NAME/)")
    return build(pipeline_config_class(), read_json(path)["config"])
