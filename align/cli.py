"""`align`: run the pipeline, one stage, validate a config, show a run's status.

    align run CONFIG [key.sub=value ...] [--wait [S]]  run every stage (skips finished, resumes partial)
    align stage NAME CONFIG [key.sub=value ...]  run one stage alone (its inputs must exist)
    align validate CONFIG [key.sub=value ...]   load and check a config without running anything
    align plan CONFIG [key.sub=value ...]       each stage's memory per GPU; exit 2 if one cannot fit
    align status RUN_DIR                        the state of every stage of a run
    align report RUN_DIR                        (re)build RUN_DIR/report.html
    align eval RUN_DIR [key.sub=value ...]      evaluate every policy checkpoint of a run (RUN_DIR/eval_adhoc/)
    align keys                                  every config key with its type, default and help
    align rm train CONFIG [key.sub=value ...]   train only the reward-model stages of a config
    align rm eval CHECKPOINT DATA --format FMT  evaluate a reward model on a preference file
    align label COMMAND ...                     preference labeling: add-labeler, generate, serve, auto, export, status

Exit codes: 0 done; 2 bad input or a failed stage (the message says what to fix); 3 a round labeled by
people (label.judge: people) is not complete yet: label it on the page, then rerun (or use --wait);
130 interrupted (Ctrl-C). After 2, 3 and 130 the same command resumes where the run stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from align import pipeline
from align.config import DatasetSpec, load_config, pipeline_config_class
from align.configlib import ConfigError, apply_overrides, build, help_lines
from align.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_LABELING, AlignError, LabelingPending
from align.evaluation import evaluate_run
from align.io import read_json
from align.label.cli import dispatch as label_dispatch, register as register_label
from align.models import check_model_dir
from align.report import build_report
from align.rundir import instances
from align.stages import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="align",
        description="The Llama 2-Chat alignment recipe as one pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline of a config")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.sub=value")
    r.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=math.inf,
        default=None,
        metavar="SECONDS",
        help="a round labeled by people (label.judge: people) that is not complete: show its progress "
        "and wait for it (at most SECONDS; no value = until it is complete) instead of stopping; "
        "give it after the overrides",
    )
    s = sub.add_parser("stage", help="run one stage of a config")
    s.add_argument("name")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("name")
    w.add_argument("config")
    w.add_argument("overrides", nargs="*")
    v = sub.add_parser("validate", help="load and check a config")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    pl = sub.add_parser("plan", help="each stage's estimated memory per GPU; exit 2 naming the key to change")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    pl.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = the config's precision, bf16 for auto"
    )
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (tensor parallelism within one)")
    st = sub.add_parser("status", help="the state of a run directory")
    st.add_argument("run_dir")
    ev = sub.add_parser("eval", help="evaluate every policy checkpoint of a run (needs an eval: section)")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="key.sub=value applied to the run's config")
    rp = sub.add_parser("report", help="(re)build RUN_DIR/report.html")
    rp.add_argument("run_dir")
    sub.add_parser("keys", help="every config key with its help text")
    rm = sub.add_parser("rm", help="reward-model jobs").add_subparsers(dest="rm_cmd", required=True)
    rt = rm.add_parser("train", help="train the reward-model stages of a config (rm_helpful, rm_safety)")
    rt.add_argument("config")
    rt.add_argument("overrides", nargs="*")
    re_ = rm.add_parser("eval", help="evaluate a reward-model checkpoint on preference data")
    re_.add_argument("checkpoint", help="a reward-model directory (from_pretrained)")
    re_.add_argument("data", help="a preference file (any importer format)")
    re_.add_argument(
        "--format",
        default="trl_jsonl",
        help="importer: hh | oasst | sharegpt_dpo | trl_jsonl (default) | ultrafeedback",
    )
    re_.add_argument("--limit", type=int, default=0, help="evaluate at most this many pairs (0 = all)")
    re_.add_argument(
        "--out", default="", help="directory for eval.json, eval.md, eval_gaps.png and eval_calibration.png"
    )
    re_.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per prompt+response (default: the RM's scorer.json, else 1024)",
    )
    re_.add_argument("--bad-rows", default="skip", choices=["fail", "skip"], help="a malformed row: fail or skip")
    register_label(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        return _dispatch(args)
    except LabelingPending as e:
        print(f"align: {e}", file=sys.stderr)
        return EXIT_LABELING
    except (ConfigError, AlignError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("align: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args) -> int:
    if args.cmd == "label":
        return label_dispatch(args)
    if args.cmd == "keys":
        print("\n".join(help_lines(pipeline_config_class())))
        return 0
    if args.cmd == "eval":
        pipeline_config = pipeline_config_class()
        raw = apply_overrides(pipeline_config, read_json(Path(args.run_dir) / "run.json")["config"], args.overrides)
        cfg = build(pipeline_config, raw)
        if cfg.eval is None:
            raise ConfigError(
                f"{args.run_dir}: its config has no eval: section; add one (see configs/default.yaml) "
                "or pass it as overrides, e.g. eval.prompts=[{format: oasst_prompts, path: ...}]"
            )
        out = Path(args.run_dir) / "eval_adhoc"
        evaluate_run(cfg, Path(args.run_dir), out)
        print((out / "eval.md").read_text())
        return 0
    if args.cmd == "report":
        print(build_report(args.run_dir, [i[0] for i in instances(pipeline.load_run(args.run_dir))]))
        return 0
    if args.cmd == "status":
        print(pipeline.status_table(pipeline.load_run(args.run_dir)))
        return 0
    if args.cmd == "plan":
        from align.plan import main as plan_main

        return plan_main(args.config, args.overrides, args.gpu_mem_gib, args.dtype, args.gpus_per_node)
    if args.cmd == "rm" and args.rm_cmd == "eval":
        return _rm_eval(args)
    cfg = load_config(args.config, args.overrides)
    if args.cmd == "rm":
        names = [n for n in cfg.stages if STAGES[n].kind == "reward"]
        if not names:
            raise ConfigError(f"{args.config}: lists no reward-model stage (rm_helpful, rm_safety) in stages")
        for name in names:
            pipeline.run_pipeline(cfg, args.config, tuple(args.overrides), only=name)
        return 0
    if args.cmd == "validate":
        print(f"{args.config}: OK ({len(cfg.stages)} stages: {', '.join(cfg.stages)}; run_dir {cfg.run_dir})")
        return 0
    if args.cmd == "run":
        manifests = pipeline.run_pipeline(cfg, args.config, tuple(args.overrides), wait_s=args.wait)
        print(f"[align] run finished: {len(manifests)} stage(s) in {cfg.run_dir}")
        return 0
    if args.cmd == "stage":
        names = [i[0] for i in instances(cfg)]
        if args.name not in names:
            raise ConfigError(f"stage '{args.name}' is not in this config's stages: {', '.join(names)}")
        pipeline.run_pipeline(cfg, args.config, tuple(args.overrides), only=args.name)
        return 0
    if args.cmd == "worker":
        pipeline.run_worker(cfg, args.name)
        return 0
    raise AssertionError(args.cmd)


def _rm_eval(args) -> int:
    from align.data.load import load_records  # datasets
    from reward.evaluate import evaluate, markdown_report, write_eval
    from reward.model import RewardScorer

    check_model_dir(Path(args.checkpoint), "CHECKPOINT")
    spec = build(DatasetSpec, {"format": args.format, "path": str(Path(args.data).resolve()), "limit": args.limit})
    records, report = load_records(spec, "preference", ".", args.bad_rows)
    if not records:
        raise ConfigError(f"{args.data}: no preference pairs to evaluate")
    results = evaluate(RewardScorer.from_pretrained(args.checkpoint, max_length=args.max_length), records)
    print(markdown_report(results))
    if report.n_skipped:
        print(f"({report.n_skipped} bad rows skipped: {report.skipped})")
    if args.out:
        write_eval(results, args.out)
        print(f"written to {args.out}/eval.json, eval.md, eval_gaps.png, eval_calibration.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
