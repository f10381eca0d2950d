"""One labeling round of the pipeline: generate -> label (auto judge or people) -> export.

    summary = run_label_round(cfg, cfg_label, round_number=1, out_dir=run_dir / "label" / "round-1")

Resumable: a round already in the store is not generated again (a round is stored in one
transaction, so it is there whole or not at all); the auto labelers label only what is still open;
the export is rewritten atomically.

With ``label.judge: people`` the round's pairs wait in the store for labelers (`align label serve`):
until the round is complete (`round_progress`) the stage raises `LabelingPending`, which stops
`align run` with exit code 3 and one line saying how far the round is; a rerun (or ``--wait``)
continues. The export then keeps only the pairs that have all their labels. Once labeled, the
round is closed in the store (`LabelStore.close_round`): the page offers none of its pairs again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from align.errors import AlignError, LabelingPending

if TYPE_CHECKING:
    from align.pipeline import StageContext

DB_NAME = "labels.db"
POLL_S = 5.0  # how often `align run --wait` reads the store


def round_progress(row: dict, min_share: float = 1.0) -> dict:
    """How far a stored round (a `LabelStore.rounds()` row) is: ``pairs``, ``complete`` (pairs with
    labels_per_pair labels that are not skips), ``needed`` (ceil(min_share * pairs), at least 1), ``done``."""
    needed = max(1, math.ceil(min_share * row["pairs"] - 1e-9))  # the epsilon: 0.9 * 10 is 9.000000000000002
    return {
        "round": row["round"],
        "pairs": row["pairs"],
        "complete": row["complete_pairs"],
        "needed": needed,
        "done": row["complete_pairs"] >= needed,
    }


def progress_line(progress: dict) -> str:
    """``round 2: 37 of 128 pairs labeled`` (with the number needed when that is fewer than all)."""
    need = f" ({progress['needed']} needed)" if progress["needed"] < progress["pairs"] else ""
    return f"round {progress['round']}: {progress['complete']} of {progress['pairs']} pairs labeled{need}"


def _round_row(store, number: int) -> dict:
    return next(r for r in store.rounds() if r["round"] == number)


def wait_for_round(
    store,
    number: int,
    min_share: float,
    wait_s: float,
    *,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = lambda line: print(f"[label] {line}", flush=True),
) -> dict:
    """Read the store every ``poll_s`` until round ``number`` is done or ``wait_s`` seconds have
    passed (math.inf: no limit); say each change of progress; return the last `round_progress`."""
    deadline = clock() + wait_s
    last = None
    while True:
        progress = round_progress(_round_row(store, number), min_share)
        if progress != last:
            say(progress_line(progress))
            last = progress
        if progress["done"] or clock() >= deadline:
            return progress
        sleep(max(0.0, min(poll_s, deadline - clock())))


def run_label_round(
    cfg,
    label_cfg,
    round_number: int,
    out_dir: str | Path,
    *,
    db: Optional[str | Path] = None,
    run_dir: Optional[str | Path] = None,
    url: Optional[str] = None,
    stage_dirs: Optional[dict] = None,
    wait_s: Optional[float] = None,
) -> dict:
    """Generate round ``round_number`` (if not in the store yet), have it labeled, and export its
    majority labels to ``out_dir``.

    Args:
        cfg: the `PipelineConfig` (model, rollout engine, data_dir, seed).
        label_cfg: the `LabelConfig`; its ``judge`` says who labels: the automatic judge (through the
            HTTP API, here and now) or people (on the labeling page, between runs).
        round_number: the round (>= 1); its prompts and samples depend on (cfg.seed, round_number).
        out_dir: where the export goes (preference.jsonl, agreement.jsonl, stats.json).
        db: the store (a SQLite path or a database URL); default ``label_cfg.db``, else ``<run_dir>/labels.db``.
        run_dir: where stage outputs (policy, reward models) are found; default ``cfg.run_dir``.
        url: label through a live server at this URL instead of in process (judge auto).
        wait_s: judge people: wait up to this many seconds (math.inf: no limit) for the round to be
            complete; None = do not wait.

    Returns:
        The round's metrics: generation counts, labeler counts, the export stats and the agreement figures.

    Raises:
        LabelingPending: judge people and the round is not complete (the store keeps the round).
    """
    from align.label.agreement import agreement_metrics, round_agreement
    from align.label.auto import auto_labelers, label_round, make_judge
    from align.label.export import ExportPolicy, resolve_round, write_export
    from align.label.generate import generate_configured_round, resolve_model
    from align.label.report import write_quality_table
    from align.label.store import LabelStore

    if round_number < 1:
        raise AlignError(f"round_number={round_number}: rounds count from 1")
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    db = db if db is not None else (label_cfg.db or run_dir / DB_NAME)
    people = label_cfg.judge == "people"
    store = LabelStore.open(db)
    summary: dict = {"round": round_number}
    try:
        # People claim the slots as they ask for work (no assignment up front), so a labeler who
        # never shows up holds no pairs; the auto labelers take one slot of every pair each.
        labelers = [] if people else auto_labelers(store, label_cfg.labels_per_pair)
        stored = {r["round"]: r for r in store.rounds()}
        if round_number not in stored:
            summary.update(
                generate_configured_round(
                    store,
                    cfg,
                    label_cfg,
                    round_number,
                    run_dir,
                    assign_to=[name for name, _ in labelers],
                    stage_dirs=stage_dirs,
                )
            )
        elif people:
            summary.update(stored[round_number]["settings"].get("counts", {}))
        policy = ExportPolicy.from_config(label_cfg, cfg.seed)
        row = _round_row(store, round_number)
        if people:
            progress = round_progress(row, label_cfg.min_complete_share)
            if not progress["done"] and wait_s:
                progress = wait_for_round(store, round_number, label_cfg.min_complete_share, wait_s)
            if not progress["done"]:
                raise LabelingPending(
                    f"{progress_line(progress)}; serve with: align label serve --db {db}; rerun to continue"
                )
            # A pair short of its labels when the round is called complete is dropped ("incomplete").
            policy = ExportPolicy.from_config(label_cfg, cfg.seed, min_votes=row["labels_per_pair"])
            summary.update({"label/complete_pairs": progress["complete"], "label/needed_pairs": progress["needed"]})
        else:
            auto = label_cfg.auto
            helpful = safety = None
            if auto.judge == "reward":
                helpful = resolve_model(cfg, auto.helpful_rm, run_dir, "label.auto.helpful_rm", stage_dirs)
                safety = resolve_model(cfg, auto.safety_rm, run_dir, "label.auto.safety_rm", stage_dirs)
            judge = make_judge(auto, helpful, safety)
            summary.update(label_round(store, round_number, auto, judge, labelers=labelers, seed=cfg.seed, url=url))
        # Closed before it is read: a label that arrives later cannot make the export out of date, and
        # the pairs dropped as incomplete are no longer offered on the page.
        store.close_round(round_number)
        pairs = store.round_pairs(round_number)
        records, rows, stats = resolve_round(pairs, round_number, policy)
        write_export(records, rows, stats, out_dir)
        agreement = round_agreement(pairs, row["labels_per_pair"])
        write_quality_table(agreement, Path(out_dir))
        summary.update({k: v for k, v in stats.items() if k.startswith("label/")})
        summary.update(agreement_metrics(agreement))
    finally:
        store.close()
    return summary


def run_label(ctx: StageContext) -> dict:
    """The pipeline's `label` stage: one round (the stage's round number) into the run's label store."""
    from align.io import write_json_atomic
    from align.stages import STAGES

    dirs = {name: ctx.stage_dir(name) for name in STAGES}
    db = ctx.stage_cfg.db or ctx.run_dir / DB_NAME
    try:
        summary = run_label_round(
            ctx.cfg,
            ctx.stage_cfg,
            ctx.round,
            ctx.out_dir,
            db=db,
            run_dir=ctx.run_dir,
            stage_dirs=dirs,
            wait_s=ctx.wait_s,
        )
    except LabelingPending as e:
        # Kept in the work directory (so the stage shows as partial) for `align status`.
        write_json_atomic(ctx.work_dir / "pending.json", {"message": str(e), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        raise
    if not (ctx.out_dir / "preference.jsonl").is_file():
        raise AlignError(f"label round {ctx.round}: the export wrote no preference.jsonl")
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}
