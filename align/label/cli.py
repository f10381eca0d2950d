"""`align label ...`: the preference-labeling loop from the command line.

    align label add-labeler NAME [--admin] --db PATH      create a labeler; prints their token once
    align label reset-token NAME --db PATH                 a new token for NAME (the old one stops working)
    align label generate CONFIG [key=value ...] --db PATH [--round N]
                                                           sample two responses per prompt -> round N
    align label serve --db PATH [--host 127.0.0.1] [--port 8000]
                                                           the labeling page (/), the admin view (/admin), the JSON API
    align label auto --db PATH --round N [--judge rules|reward --helpful-rm DIR --safety-rm DIR]
                                                           label round N with the automatic judge
    align label export --db PATH --round N --out DIR       majority labels -> preference.jsonl
    align label status --db PATH                           rounds: progress, agreement (kappa), gold accuracy, pace

``--db`` is a SQLite file (created if missing) or a database URL. Only argparse and the config
dataclasses are imported here; each command imports what it needs.
"""

from __future__ import annotations

import argparse

from align.label.config import SKIP_POLICIES, TIE_POLICIES, AutoLabelConfig, LabelConfig

_AUTO = {f: AutoLabelConfig.__dataclass_fields__[f] for f in AutoLabelConfig.__dataclass_fields__}
_LABEL = LabelConfig.__dataclass_fields__


def _help(fields, name: str) -> str:
    return fields[name].metadata["help"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``label`` command (with its sub-commands) to the `align` CLI's subparsers."""
    p = subparsers.add_parser(
        "label",
        help="the preference-labeling loop (generate, serve, auto, export)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="label_cmd", required=True, metavar="COMMAND")

    def db(q):
        q.add_argument("--db", required=True, help="SQLite file (created if missing) or database URL")

    a = sub.add_parser(
        "add-labeler", help="create a labeler and print their token (shown once; only its hash is stored)"
    )
    a.add_argument("name", help="1-64 letters, digits or _ . @ -")
    a.add_argument("--admin", action="store_true", help="may create rounds, export and add labelers over the API")
    db(a)

    r = sub.add_parser("reset-token", help="give a labeler a new token; the old one stops working")
    r.add_argument("name")
    db(r)

    g = sub.add_parser("generate", help="sample two responses per prompt from the policy and store them as a round")
    g.add_argument("config", help="pipeline YAML with a label: section")
    g.add_argument("overrides", nargs="*", help="key.sub=value (label keys as label.key=value)")
    db(g)
    g.add_argument("--round", type=int, default=None, help="round number (default: one after the highest)")
    g.add_argument(
        "--assign-to",
        default=None,
        help="comma-separated labeler names to assign the pairs to (default: every non-admin labeler; "
        "'' = none, labelers claim pairs as they ask for work)",
    )

    s = sub.add_parser("serve", help="serve the labeling page and the JSON API")
    db(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1 = this machine only)")
    s.add_argument("--port", type=int, default=8000)

    au = sub.add_parser("auto", help="label a round with the automatic judge, through the HTTP API")
    db(au)
    au.add_argument("--round", type=int, required=True)
    au.add_argument("--judge", choices=("reward", "rules"), default=_AUTO["judge"].default, help=_help(_AUTO, "judge"))
    au.add_argument("--helpful-rm", default=None, help="helpfulness RM directory (judge reward)")
    au.add_argument("--safety-rm", default=None, help="safety RM directory (judge reward)")
    au.add_argument(
        "--labelers",
        type=int,
        default=_LABEL["labels_per_pair"].default,
        help="auto labelers auto-1..auto-K; each takes one slot of every pair",
    )
    au.add_argument(
        "--rating-gaps",
        type=float,
        nargs=3,
        default=None,
        metavar=("SIG", "BETTER", "SLIGHT"),
        help=_help(_AUTO, "rating_gaps"),
    )
    au.add_argument("--tie-below", type=float, default=_AUTO["tie_below"].default, help=_help(_AUTO, "tie_below"))
    au.add_argument("--flip-prob", type=float, default=_AUTO["flip_prob"].default, help=_help(_AUTO, "flip_prob"))
    au.add_argument("--seed", type=int, default=0, help="seed of the flips")
    au.add_argument("--url", default=None, help="a live server (e.g. http://127.0.0.1:8000); default: in process")

    e = sub.add_parser("export", help="write a round's majority labels as canonical preference records")
    db(e)
    e.add_argument("--round", type=int, required=True)
    e.add_argument("--out", required=True, help="output directory (preference.jsonl, agreement.jsonl, stats.json)")
    e.add_argument("--ties", choices=TIE_POLICIES, default=_LABEL["ties"].default, help=_help(_LABEL, "ties"))
    e.add_argument("--skips", choices=SKIP_POLICIES, default=_LABEL["skips"].default, help=_help(_LABEL, "skips"))
    e.add_argument(
        "--keep-unsafe-chosen",
        action="store_true",
        help="keep pairs whose chosen response is unsafe and rejected safe (dropped by default)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the order of kept ties")

    st = sub.add_parser("status", help="every round: progress, agreement, kappa, gold accuracy, time per label")
    db(st)
    return p


def dispatch(args) -> int:
    """Run the ``align label`` sub-command in ``args``; return the exit status."""
    from align.label.store import LabelStore

    cmd = args.label_cmd
    if cmd == "serve":
        from align.label.server import serve

        serve(args.db, args.host, args.port)
        return 0
    store = LabelStore.open(args.db)
    try:
        if cmd == "add-labeler":
            token = store.add_labeler(args.name, admin=args.admin)
            print(f"labeler {args.name}{' (admin)' if args.admin else ''} created. Token (shown once; keep it):")
            print(token)
            return 0
        if cmd == "reset-token":
            print(store.reset_token(args.name))
            return 0
        if cmd == "status":
            from align.label.report import status_lines

            print("\n".join(status_lines(store)))
            return 0
        if cmd == "generate":
            return _generate(store, args)
        if cmd == "auto":
            return _auto(store, args)
        if cmd == "export":
            from align.label.export import ExportPolicy, export_round

            policy = ExportPolicy(
                ties=args.ties, skips=args.skips, drop_unsafe_chosen=not args.keep_unsafe_chosen, seed=args.seed
            )
            stats = export_round(store, args.round, args.out, policy)
            print(f"round {args.round}: kept {stats['label/kept']} of {stats['label/pairs']} pairs -> {args.out}")
            return 0
    finally:
        store.close()
    raise AssertionError(cmd)


def _generate(store, args) -> int:
    from pathlib import Path

    from align.label.config import load_label_config
    from align.label.generate import generate_configured_round

    cfg, label = load_label_config(args.config, args.overrides)
    number = args.round if args.round is not None else max((r["round"] for r in store.rounds()), default=0) + 1
    assign = None if args.assign_to is None else [n for n in args.assign_to.split(",") if n]
    out = generate_configured_round(store, cfg, label, number, Path(cfg.run_dir), assign_to=assign)
    print(
        f"round {out['round']}: {out['label/pairs']} pairs from {out['label/prompts']} prompts "
        f"({out['label/dropped_empty']} empty, {out['label/dropped_identical']} identical left out)"
        + (f", {out['label/gold_pairs']} gold pairs" if out["label/gold_pairs"] else "")
    )
    return 0


def _auto(store, args) -> int:
    from align.label.auto import auto_labelers, label_round, make_judge

    kwargs = {"judge": args.judge, "tie_below": args.tie_below, "flip_prob": args.flip_prob}
    if args.rating_gaps is not None:
        kwargs["rating_gaps"] = tuple(args.rating_gaps)
    cfg = AutoLabelConfig(**kwargs)
    judge = make_judge(cfg, args.helpful_rm, args.safety_rm)
    labelers = auto_labelers(store, args.labelers)
    counts = label_round(store, args.round, cfg, judge, labelers=labelers, seed=args.seed, url=args.url)
    print(f"round {args.round}: " + ", ".join(f"{k.removeprefix('auto/')} {v}" for k, v in counts.items()))
    return 0
