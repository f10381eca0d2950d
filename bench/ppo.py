"""PPO seconds per iteration: ours (align/ppo) against TRL 1.12's experimental PPOTrainer, same settings.

    .venv/bin/python bench/ppo.py                      # SmolLM2-135M-Instruct, bf16, 3 iterations x 16 prompts
    .venv/bin/python bench/ppo.py --iterations 4 --prompts-per-iteration 32 --max-new-tokens 128
    .venv/bin/python bench/ppo.py --skip-trl           # ours alone

Both sides get the same model (the embedded SmolLM2-135M-Instruct), dtype (bf16 frozen weights, bf16
autocast), LoRA (r 16 on all linear projections), prompts (../shared/data/oasst prompt lottery, or
synthetic prompts if it is absent), prompts per iteration, mini-batch, micro-batch, response length,
temperature 1, PPO epochs, lr/clip/kl settings, and the same reward model (SmolLM2 with a seeded random
scalar head: the timing does not depend on what it rewards).

What necessarily differs, by design of each implementation (read the phase split):
- generation: ours samples with vLLM (in-process, bf16); TRL with transformers `generate`;
- rewards: ours scores with TWO reward models (helpfulness and safety; Llama 2 sec. 3.2.3), both
  pointed at the same RM here; TRL with one;
- value function: ours is a head on the policy's hidden states; TRL trains a separate value model
  (a full AutoModelForSequenceClassification, all weights trained), as its PPOTrainer requires;
- the reference policy is the adapters-off policy in both (TRL with peft_config uses that too).

Each side runs in its own subprocess. TRL 1.12 is installed once, without dependencies, into
bench/out/trl112 (`pip install --no-deps --target`), and put first on PYTHONPATH for its subprocess, so it
shares this environment's torch, transformers, accelerate and peft (the same kernels as ours); TRL 1.13+
(the one installed here) no longer has a PPO trainer. If the install or the run fails, the report says
so and gives no ratio. Seconds per iteration are the mean over iterations after the first (warm-up);
the first is reported too. Output: a table and bench/out/ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
TRL_VERSION = "1.12.0"
TRL_DIR = OUT / "trl112"
PROMPT_FILE = ROOT.parent / "shared" / "data" / "oasst" / "prompt_lottery_en_250_text.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations of each side")
    p.add_argument("--prompts-per-iteration", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="both sides' dtype, as the pipeline's precision (auto: bf16 with bf16 units, else fp32)",
    )
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--eager", action="store_true", help="ours without torch.compile of the decoder layers (ppo.compile)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of each side, training and generation (0 = all). "
        "On a machine shared with other jobs use 1: two OpenMP threads that wait for each other at every "
        "barrier while other processes hold the cores ran a SmolLM2 forward+backward 10x slower than one",
    )
    p.add_argument("--skip-trl", action="store_true", help="run ours only")
    p.add_argument("--only", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one side, in this process
    p.add_argument("--out", default=str(OUT / "ppo.json"))
    args = p.parse_args(argv)
    from align.precision import resolve_precision

    args.dtype = resolve_precision(args.precision).dtype  # what the TRL side and the reward model load in
    return args


# ---------------------------------------------------------------------------------------------------
# Shared inputs


def reward_model_dir(dtype: str) -> Path:
    """SmolLM2 with a seeded random scalar head, saved once (the RM of both sides)."""
    from align.models import _atomic_dir, embedded_model_dir

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from align.models import load_tokenizer

        src = embedded_model_dir()
        tok = load_tokenizer(src)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)

    return _atomic_dir(OUT / "ppo" / "rm-smollm2-random-head", build)


def prompt_spec() -> dict:
    if PROMPT_FILE.is_file():
        return {"format": "oasst_prompts", "path": str(PROMPT_FILE)}
    return {"format": "synthetic_prompts", "limit": 256}


def load_prompt_rows(args) -> list[dict]:
    from align.config import DatasetSpec
    from align.data.load import load_datasets

    spec = DatasetSpec(**prompt_spec())
    ds, _ = load_datasets([spec], "prompt", ROOT.parent / "shared" / "data", "skip", 0)
    return ds.to_list()


# ---------------------------------------------------------------------------------------------------
# Ours


def set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def run_ours(args) -> dict:
    from align.config import PipelineConfig
    from align.configlib import build
    from align.io import read_metrics
    from align.pipeline import prepare
    from align.ppo.stage import run_ppo

    set_threads(args.threads)
    run_dir = OUT / "ppo" / "ours-run"
    rm = reward_model_dir(args.dtype)
    rm_section = lambda cat: {
        "init": "base",
        "category": cat,
        "primary": [{"format": "synthetic_pref"}],  # noqa: E731
        "max_length": 512,
    }
    raw = {
        "name": "bench-ppo",
        "run_dir": str(run_dir),
        "seed": 0,
        "data_dir": str(ROOT.parent / "shared" / "data"),
        "stages": ["rm_helpful", "rm_safety", "ppo"],
        "precision": args.precision,
        "model": {"source": "embedded"},
        "data": {"bad_rows": "skip"},
        "rollout": {
            "engine": "vllm",
            "kv_cache_gib": 2,
            "in_process": True,
            "max_model_len": 1024,
            "threads": args.threads,
        },
        "rm_helpful": rm_section("helpfulness"),
        "rm_safety": rm_section("safety"),
        "ppo": {
            "init": "base",
            "prompts": [prompt_spec()],
            "heldout_prompts": 0,
            "iterations": args.iterations,
            "prompts_per_iteration": args.prompts_per_iteration,
            "mini_batch_size": args.mini_batch_size,
            "micro_batch_size": args.micro_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
            "lora": {"enabled": True, "r": args.lora_r, "alpha": 2 * args.lora_r},
            "save_every": 1 << 20,
            "compile": not args.eager,
        },
    }
    cfg = build(PipelineConfig, raw)
    for stage in ("rm_helpful", "rm_safety"):
        link = run_dir / stage / "model"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(rm, target_is_directory=True)
    shutil.rmtree(run_dir / ".work", ignore_errors=True)  # no metrics or checkpoints of an earlier bench run
    ctx = prepare(cfg, "ppo")
    t0 = time.perf_counter()
    summary = run_ppo(ctx)
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(ctx.work_dir / "logs" / "metrics.jsonl") if r["step"] >= 1]
    phases = ("generate", "score", "logprob", "train", "sync")
    per_it = [r["time/iteration_s"] for r in rows]
    steady = rows[1:] or rows
    return {
        "side": "ours",
        "seconds_per_iteration": sum(r["time/iteration_s"] for r in steady) / len(steady),
        "first_iteration_s": per_it[0],
        "iteration_s": per_it,
        "phases_s": {p: sum(r[f"time/{p}_s"] for r in steady) / len(steady) for p in phases},
        "tokens_per_s_generate": sum(r["rollout/tokens_per_s"] for r in steady) / len(steady),
        "response_length": sum(r["rollout/response_length"] for r in steady) / len(steady),
        "kl": [r["kl/ref_mean"] for r in rows],
        "reward": [r["reward/combined_mean"] for r in rows],
        "wall_s_including_setup_and_save": total,
        "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }


# ---------------------------------------------------------------------------------------------------
# TRL 1.12


def install_trl() -> str | None:
    """Install TRL 1.12 (no dependencies) into bench/out/trl112; None on success, else the reason."""
    if (TRL_DIR / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        return None
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--target",
        str(TRL_DIR),
        f"trl=={TRL_VERSION}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return f"`{' '.join(cmd)}` failed: {(res.stdout + res.stderr).strip()[-800:]}"
    return None


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from align.models import embedded_model_dir, load_tokenizer

    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"expected trl {TRL_VERSION} first on the path, got {trl.__version__} from {trl.__file__}")
    set_threads(args.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    src, rm = embedded_model_dir(), reward_model_dir(args.dtype)
    tok = load_tokenizer(src)
    rows = load_prompt_rows(args)
    ids = [
        tok.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for r in rows
    ]
    ids = [x["input_ids"] if isinstance(x, dict) else list(x) for x in ids]
    ids = [x for x in ids if len(x) + args.max_new_tokens <= 1024]
    train = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(str(rm), num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(str(rm), num_labels=1, dtype=dtype)
    for m in (policy, value, reward):
        m.config.pad_token_id = tok.pad_token_id
    P, M, m_ = args.prompts_per_iteration, args.mini_batch_size, args.micro_batch_size
    cfg = PPOConfig(
        # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps, cut into
        # num_mini_batches mini-batches of per_device_train_batch_size micro-batches. (Its accelerate
        # accumulation then steps the optimizer every gradient_accumulation_steps micro-batches, i.e. once
        # per rollout batch rather than per mini-batch; the compute per iteration is the same.)
        output_dir=str(OUT / "ppo" / "trl-run"),
        per_device_train_batch_size=m_,
        gradient_accumulation_steps=P // m_,
        num_mini_batches=P // M,
        local_rollout_forward_batch_size=P,
        total_episodes=args.iterations * P,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.max_new_tokens,
        temperature=1.0,
        stop_token="eos",
        learning_rate=1e-6,
        kl_coef=0.01,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        bf16=args.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        num_sample_generations=0,
        logging_steps=1,
        seed=0,
        missing_eos_penalty=None,
        dataloader_num_workers=0,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            stamps.append(time.perf_counter())

    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train,
        value_model=value,
        eval_dataset=train.select(range(2)),
        peft_config=lora,
        callbacks=[Stamp()],
    )
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    per_it = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    if len(per_it) != args.iterations:
        raise RuntimeError(f"TRL ran {len(per_it)} updates, expected {args.iterations}: the batch mapping is wrong")
    steady = per_it[1:] or per_it
    return {
        "side": f"trl {trl.__version__} experimental PPOTrainer",
        "seconds_per_iteration": sum(steady) / len(steady),
        "first_iteration_s": per_it[0] if per_it else float("nan"),
        "iteration_s": per_it,
        "wall_s_train": total,
    }


# ---------------------------------------------------------------------------------------------------


def run_side(side: str, args, argv: list[str], env_extra: dict | None = None) -> dict:
    out = OUT / "ppo" / f"{side}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    res = subprocess.run(
        [sys.executable, __file__, *argv, "--only", side, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 or not out.is_file():
        return {"side": side, "error": (res.stdout + res.stderr).strip()[-3000:]}
    return json.loads(out.read_text())


def main(argv=None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.prompts_per_iteration % args.mini_batch_size or args.mini_batch_size % args.micro_batch_size:
        raise SystemExit("prompts-per-iteration must be a multiple of mini-batch-size, and that of micro-batch-size")
    if args.only:
        result = run_ours(args) if args.only == "ours" else run_trl(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    side_argv = [a for a in raw_argv if a != "--skip-trl"]
    i = 0
    while i < len(side_argv):  # the parent's --out is not the sides'
        if side_argv[i] == "--out":
            del side_argv[i : i + 2]
        else:
            i += 1
    reward_model_dir(args.dtype)  # build once, before the sides race for it
    ours = run_side("ours", args, side_argv)
    trl_result: dict = {"side": f"trl {TRL_VERSION}", "error": "skipped (--skip-trl)"}
    if not args.skip_trl:
        reason = install_trl()
        if reason:
            trl_result = {"side": f"trl {TRL_VERSION}", "error": f"not installed: {reason}"}
        else:
            trl_result = run_side("trl", args, side_argv, {"PYTHONPATH": str(TRL_DIR)})
    from align.precision import hardware

    report = {"settings": vars(args), "hardware": hardware(), "ours": ours, "trl": trl_result}
    ok = "error" not in ours and "error" not in trl_result
    if ok:
        report["ratio_trl_over_ours"] = trl_result["seconds_per_iteration"] / ours["seconds_per_iteration"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    from align.precision import hardware_line, resolve_precision

    print(hardware_line(resolve_precision(args.precision)))
    print(
        f"PPO, SmolLM2-135M-Instruct, {args.dtype}, {args.prompts_per_iteration} prompts/iteration, mini-batch "
        f"{args.mini_batch_size}, micro-batch {args.micro_batch_size}, {args.max_new_tokens} new tokens, "
        f"{args.ppo_epochs} PPO epoch(s), LoRA r {args.lora_r}, {args.iterations} iterations, "
        f"threads {args.threads or 'all'}; load average at the end {os.getloadavg()[0]:.1f}"
    )
    for res in (ours, trl_result):
        if "error" in res:
            print(f"  {res['side']:<40} NOT MEASURED: {res['error'][-600:]}")
        else:
            print(
                f"  {res['side']:<40} {res['seconds_per_iteration']:7.2f} s/iteration (first {res['first_iteration_s']:.2f} s)"
            )
    if "error" not in ours:
        split = ", ".join(f"{k} {v:.2f}" for k, v in ours["phases_s"].items())
        print(
            f"  ours, phase split (s): {split}; generation {ours['tokens_per_s_generate']:.0f} tok/s, "
            f"mean response {ours['response_length']:.0f} tokens"
        )
    if ok:
        print(f"  ratio TRL / ours: {report['ratio_trl_over_ours']:.2f}x")
    else:
        print("  no ratio: one side was not measured (see above)")
    print(f"  JSON: {args.out}")
    return 0 if "error" not in ours else 1


if __name__ == "__main__":
    sys.exit(main())
