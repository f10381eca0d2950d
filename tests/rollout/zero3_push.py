"""Weight push from a DeepSpeed ZeRO-3 model sharded over 2 CPU processes (gloo), for
test_vllm_engine.py::test_zero3_two_process_push.

    torchrun --standalone --nproc_per_node 2 tests/rollout/zero3_push.py OUT

Both ranks build the same perturbed tiny model and shard it with ZeRO-3 (every parameter partitioned);
rank 0 owns a multiprocess-mode vLLM engine (an in-process one cannot share the trainer's
torch.distributed world). Both ranks call `push_weights` (rank 1 with no engine); rank 0 checks greedy
outputs against transformers on the unsharded weights. Then the same with a PEFT LoRA model.
Rank 0 writes the words `sharded plain_match lora_match` to OUT, each only if it held.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def load_checks():
    spec = importlib.util.spec_from_file_location("rollout_checks", HERE / "rollout_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero3(model):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        # persistence threshold 0: partition every parameter, however small (the tiny model's are)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def is_sharded(model) -> bool:
    params = list(model.parameters())
    return all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in params)


def main(out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from align.config import RolloutConfig
    from align.models import load_causal_lm, tiny_model_dir
    from rollout import make_engine, push_weights

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    checks = load_checks()
    tiny = tiny_model_dir()
    engine = None
    if rank == 0:
        engine = make_engine(RolloutConfig(kv_cache_gib=1, max_model_len=512, in_process=False), tiny, dtype="float32")
    results = []
    try:
        for name, build in (("plain", checks.perturbed), ("lora", checks.lora_wrapped)):
            ref = build(load_causal_lm(tiny, "float32"))
            ds = zero3(build(load_causal_lm(tiny, "float32")))
            if name == "plain" and is_sharded(ds.module):
                results.append("sharded")
            push_weights(engine, ds)
            if engine is not None:
                try:
                    checks.check_greedy_matches(engine, ref)
                    results.append(f"{name}_match")
                except AssertionError as e:
                    print(f"{name} mismatch:", e, flush=True)
    finally:
        if engine is not None:
            engine.close()
    # ranks leave together, after rank 0's engine has shut down: a rank that tore down its gloo group
    # while the other still had work in flight aborted ("terminate called without an active exception")
    dist.barrier()
    if rank == 0:
        Path(out).write_text(" ".join(results) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
