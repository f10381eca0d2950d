"""The device check: the whole pipeline on one GPU with SmolLM2 from the wheel and the official vLLM,
then the engine against transformers `generate` and the weight-sync time. Meant to finish in <= 8 min.

    python bench/gpu.py                 # on a GPU machine: SmolLM2-135M, configs/default.yaml's stages
    python bench/gpu.py --dry           # CPU, tiny random model: the same code in seconds (tests/bench)
    scripts/gpu_check.sh                # the same, with its output kept under bench/out/

Prints each stage's wall time (from its manifest), vLLM and transformers tokens/s on the same prompts
and their ratio, and the time of one streamed weight push (plain model), then writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# GPU run: configs/default.yaml's stages at their own sizes, the engine set for a GPU.
GPU_OVERRIDES = [
    "rollout.in_process=true",
    "rollout.gpu_memory_utilization=0.3",
    "rollout.enforce_eager=false",
]
# Dry run: configs/tiny.yaml cut to seconds (one optimizer step a stage).
DRY_OVERRIDES = [
    "stages=[sft]",
    "sft.train.max_steps=1",
    "sft.datasets=[{format: synthetic_sft, limit: 8}]",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny model, seconds (what tests/bench runs)")
    p.add_argument("--run-dir", default="", help="run directory (default: bench/out/gpu-run or gpu-dry)")
    p.add_argument("--out", default="", help="JSON figures (default: bench/out/gpu.json or gpu-dry.json)")
    p.add_argument("--prompts", type=int, default=64, help="prompts for the engine comparison")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--skip-pipeline", action="store_true", help="only the engine comparison and the push")
    return p.parse_args(argv)


def run_pipeline(config: Path, overrides: list[str]) -> dict[str, float]:
    """`align run` of `config`; {stage: wall seconds} from the manifests."""
    from align.config import load_config
    from align.pipeline import instances, run_pipeline as run

    cfg = load_config(config, overrides)
    run(cfg, str(config), tuple(overrides))
    out = {}
    for name, *_ in instances(cfg):
        manifest = Path(cfg.run_dir) / name / "manifest.json"
        out[name] = json.loads(manifest.read_text())["wall_s"]
    return out


def engine_figures(model_dir: Path, dtype: str, args, dry: bool) -> dict:
    """Tokens/s of transformers and vLLM on the same prompts, and one streamed push's seconds."""
    from align.config import RolloutConfig
    from align.models import load_causal_lm
    from rollout import SamplingParams, make_engine

    prompts = [
        [{"role": "user", "content": f"Write a short note about topic number {i}."}] for i in range(args.prompts)
    ]
    sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    ro = dict(kv_cache_gib=1, max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=dry)
    figures = {}
    # transformers first: an in-process vLLM engine on CPU pins this process's threads
    with make_engine(RolloutConfig(engine="transformers", **ro), model_dir, seed=0, dtype=dtype) as hf:
        r = hf.generate(prompts, sampling)
        figures["transformers_tokens_per_s"] = r.timing.tokens_per_s
    start = time.perf_counter()
    with make_engine(RolloutConfig(engine="vllm", in_process=True, **ro), model_dir, seed=0, dtype=dtype) as engine:
        figures["vllm_load_s"] = time.perf_counter() - start
        engine.generate(prompts[:2], sampling)  # warm-up (CUDA graphs, kernels)
        r = engine.generate(prompts, sampling)
        figures["vllm_tokens_per_s"] = r.timing.tokens_per_s
        figures["tokens"] = r.timing.generated_tokens
        policy = load_causal_lm(model_dir, "float32")
        if not dry:
            policy = policy.to("cuda")
        figures["weight_sync_s"] = engine.update_weights(policy)
    figures["vllm_over_transformers"] = figures["vllm_tokens_per_s"] / figures["transformers_tokens_per_s"]
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from align.models import embedded_model_dir, tiny_model_dir
    from align.precision import resolve_precision

    if not args.dry and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --dry for the CPU check", file=sys.stderr)
        return 2
    tag = "gpu-dry" if args.dry else "gpu"
    out_dir = ROOT / "bench" / "out"
    run_dir = Path(args.run_dir or out_dir / f"{tag}-run")
    out = Path(args.out or out_dir / f"{tag}.json")
    precision = resolve_precision("fp32" if args.dry else "auto")
    device = "cpu" if args.dry else torch.cuda.get_device_name(0)
    print(f"device: {device}; precision: {precision.name}")
    t0 = time.perf_counter()
    stages = {}
    if not args.skip_pipeline:
        config = ROOT / "configs" / ("tiny.yaml" if args.dry else "default.yaml")
        overrides = (DRY_OVERRIDES if args.dry else GPU_OVERRIDES) + [f"run_dir={run_dir}"]
        stages = run_pipeline(config, overrides)
    model_dir = tiny_model_dir() if args.dry else embedded_model_dir()
    figures = engine_figures(model_dir, precision.dtype, args, args.dry)
    result = {"device": device, "precision": precision.name, "stages_s": stages, **figures}
    result["total_s"] = time.perf_counter() - t0
    print(f"{'stage':<24} {'seconds':>8}")
    for name, s in stages.items():
        print(f"{name:<24} {s:>8.1f}")
    print(
        f"vLLM {figures['vllm_tokens_per_s']:.0f} tok/s, transformers {figures['transformers_tokens_per_s']:.0f} "
        f"tok/s ({figures['vllm_over_transformers']:.1f}x); weight sync {figures['weight_sync_s']:.3f} s; "
        f"total {result['total_s']:.0f} s"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
