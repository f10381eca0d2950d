"""One reward-model optimizer step four ways, interleaved step by step: compiled or eager, and one
`[prompt, chosen, rejected]` row a pair (`shared_prefix_batch`) or chosen and rejected as rows of their
own. The default `rm_safety` settings (8 HH pairs a step in micro-batches of 4, `freeze_layers`,
`max_length`), SmolLM2-135M from the base model, the run's precision.

    .venv/bin/python bench/rm_step.py               # 8 steps x 2 rounds after a warm-up round
    .venv/bin/python bench/rm_step.py --rounds 3

Interleaving puts every variant through the same load drift of a shared machine; the first round
(compiles, allocator warm-up) is not counted. Prints each variant's mean and median seconds a step
and its ratio to the default (compiled, shared rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds over the steps (after one warm-up round)")
    p.add_argument("--steps", type=int, default=8, help="distinct steps of 8 pairs")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "rm_step.json"))
    args = p.parse_args(argv)

    from align.config import load_config
    from align.data.load import load_datasets
    from align.models import embedded_model_dir, load_tokenizer
    from align.precision import hardware_line, resolve_precision
    from reward.train import build_learner, encode_pairs, train_step

    precision = resolve_precision(args.precision)
    print(hardware_line(precision), flush=True)
    cfg = load_config(ROOT / "configs" / "default.yaml", ["rm_safety.init=base"])
    rc = cfg.stage("rm_safety")
    model_dir = embedded_model_dir()
    tok = load_tokenizer(model_dir)
    records, _ = load_datasets(rc.primary, "preference", Path(cfg.data_dir), "skip", 0)
    records = list(records)
    random.Random(0).shuffle(records)
    batch = rc.train.batch_size
    pairs = encode_pairs(tok, records[: args.steps * batch], rc)
    steps = [pairs[i * batch : (i + 1) * batch] for i in range(args.steps)]
    mb = rc.train.micro_batch_size
    learners = {}
    for compiled in (True, False):
        tc = dataclasses.replace(rc.train, compile=compiled)
        learners[compiled] = build_learner(model_dir, tok, tc, 0, precision.bf16, None, rc.freeze_layers)[0]
    variants = [(c, s) for c in (True, False) for s in (True, False)]
    times: dict = {v: [] for v in variants}
    for rnd in range(args.rounds + 1):
        for i, step in enumerate(steps):
            micro = [step[j : j + mb] for j in range(0, len(step), mb)]
            for compiled, shared in variants:
                t = time.perf_counter()
                train_step(learners[compiled], micro, rc, i + 1, tok.pad_token_id, shared, precision.bf16)
                if rnd > 0:
                    times[(compiled, shared)].append(time.perf_counter() - t)
    base = statistics.fmean(times[(True, True)])
    rows = []
    for (compiled, shared), ts in times.items():
        name = f"{'compiled' if compiled else 'eager'}, {'one row a pair' if shared else 'rows of their own'}"
        mean, med = statistics.fmean(ts), statistics.median(ts)
        rows.append({"variant": name, "mean_s": mean, "median_s": med, "n": len(ts), "vs_default": mean / base})
        print(f"{name:<36} mean {mean:6.2f} s  median {med:6.2f} s  n={len(ts)}  {mean / base:.2f}x the default")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware_line(precision), "precision": precision.name, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
