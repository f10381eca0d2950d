"""One simulated labeling round: generate -> auto label -> export (for the pipeline's RLHF rounds).

    summary = run_label_round(cfg, cfg_label, round_number=1, out_dir=run_dir / "label" / "round-1")

Resumable: a round already in the store is not generated again (a round is stored in one
transaction, so it is there whole or not at all); the auto labelers label only what is still open;
the export is rewritten atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from align.errors import AlignError

DB_NAME = "labels.db"


def resolve_model(cfg, name: str, run_dir: Path, key: str, stage_dirs: Optional[dict] = None) -> Path:
    """The model directory ``name`` stands for: 'base' (the config's model), an earlier stage's
    ``model/`` in ``run_dir`` (its latest round's, from ``stage_dirs``), or a local directory."""
    from align.config import STAGE_KINDS
    from align.models import check_model_dir, resolve_model_dir

    if name == "base":
        return resolve_model_dir(cfg.model)
    stage = (stage_dirs or {}).get(name, run_dir / name)
    if (stage / "manifest.json").is_file() and (stage / "model").is_dir():
        return stage / "model"
    if name in STAGE_KINDS:
        raise AlignError(f"{key}={name!r}: stage '{name}' has not finished in {run_dir}; run it first "
                         f"(`align stage {name} CONFIG`)")
    path = Path(name).expanduser()
    check_model_dir(path, key)
    return path


def run_label_round(cfg, label_cfg, round_number: int, out_dir: str | Path, *, db: Optional[str | Path] = None,
                    run_dir: Optional[str | Path] = None, url: Optional[str] = None,
                    stage_dirs: Optional[dict] = None) -> dict:
    """Generate round ``round_number`` (if not in the store yet), label it with the automatic judge
    through the HTTP API, and export its majority labels to ``out_dir``.

    Args:
        cfg: the `PipelineConfig` (model, rollout engine, data_dir, seed).
        label_cfg: the `LabelConfig`.
        round_number: the round (>= 1); its prompts and samples depend on (cfg.seed, round_number).
        out_dir: where the export goes (preference.jsonl, agreement.jsonl, stats.json).
        db: the store (a SQLite path or a database URL); default ``<run_dir>/labels.db``.
        run_dir: where stage outputs (policy, reward models) are found; default ``cfg.run_dir``.
        url: label through a live server at this URL instead of in process.

    Returns:
        The round's metrics: generation counts, auto-labeler counts and the export stats.
    """
    from align.data.load import load_datasets
    from align.label.auto import auto_labelers, label_round, make_judge
    from align.label.export import ExportPolicy, export_round
    from align.label.generate import generate_round, select_prompts
    from align.label.store import LabelStore

    if round_number < 1:
        raise AlignError(f"round_number={round_number}: rounds count from 1")
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    store = LabelStore.open(db if db is not None else run_dir / DB_NAME)
    summary: dict = {"round": round_number}
    try:
        labelers = auto_labelers(store, label_cfg.labels_per_pair)
        if round_number not in {r["round"] for r in store.rounds()}:
            ds, _ = load_datasets(label_cfg.prompts, "prompt", Path(cfg.data_dir), cfg.data.bad_rows, cfg.seed)
            prompts = select_prompts(ds.to_list(), label_cfg.prompts_per_round, cfg.seed, round_number)
            dir_a = resolve_model(cfg, label_cfg.init, run_dir, "label.init", stage_dirs)
            dir_b = resolve_model(cfg, label_cfg.init_b, run_dir, "label.init_b", stage_dirs) if label_cfg.init_b else None
            summary.update(generate_round(
                store, prompts, cfg.rollout, label_cfg.sampling_a, label_cfg.sampling_b, dir_a, dir_b,
                dtype=cfg.compute.dtype, seed=cfg.seed, round_number=round_number, labels_per_pair=label_cfg.labels_per_pair,
                assign_to=[name for name, _ in labelers], names=(label_cfg.init, label_cfg.init_b or label_cfg.init)))
        auto = label_cfg.auto
        helpful = safety = None
        if auto.judge == "reward":
            helpful = resolve_model(cfg, auto.helpful_rm, run_dir, "label.auto.helpful_rm", stage_dirs)
            safety = resolve_model(cfg, auto.safety_rm, run_dir, "label.auto.safety_rm", stage_dirs)
        judge = make_judge(auto, helpful, safety)
        summary.update(label_round(store, round_number, auto, judge, labelers=labelers, seed=cfg.seed, url=url))
        stats = export_round(store, round_number, out_dir, ExportPolicy.from_config(label_cfg, cfg.seed))
        summary.update({k: v for k, v in stats.items() if k.startswith("label/")})
    finally:
        store.close()
    return summary


def run_label(ctx) -> dict:
    """The pipeline's `label` stage: one round (the stage's round number) into the run's label store."""
    from align.config import STAGE_KINDS

    dirs = {name: ctx.stage_dir(name) for name in STAGE_KINDS}
    summary = run_label_round(ctx.cfg, ctx.stage_cfg, ctx.round, ctx.out_dir, db=ctx.run_dir / DB_NAME,
                              run_dir=ctx.run_dir, stage_dirs=dirs)
    if not (ctx.out_dir / "preference.jsonl").is_file():
        raise AlignError(f"label round {ctx.round}: the export wrote no preference.jsonl")
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}
