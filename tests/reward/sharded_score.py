"""Reward-model scoring with the weights partitioned by ZeRO-3 over 2 CPU processes (gloo), for
test_model.py::test_partitioned_scorer_on_two_processes_equals_the_whole_model.

    torchrun --standalone --nproc_per_node 2 tests/reward/sharded_score.py RM_DIR OUT fp32|bf16

Rank 0 saves a tiny reward model (seeded head) to RM_DIR. Both ranks load it partitioned
(`RewardScorer.from_pretrained(zero3=...)`, every parameter split: persistence threshold 0) and score
rows of their own, rank 0 five and rank 1 two (in batches of 2: three forwards against one, so rank 1
must run two more), then each compares with the whole model's scores. With `bf16` the RM's
scorer.json says bfloat16 (as a bf16 run saves it): both score in bf16 weights. Rank 0 writes the words
`partitioned scores_match` to OUT, each only if it held on both ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def main(rm_dir: str, out: str, dtype: str = "float32") -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from align.models import load_tokenizer, tiny_model_dir
    from reward.model import RewardScorer, ScorerSettings, load_reward_model, save_reward_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if rank == 0:
        tok = load_tokenizer(tiny_model_dir())
        torch.manual_seed(0)
        model = load_reward_model(tiny_model_dir(), tok)
        save_reward_model(model, tok, rm_dir, RewardScorer(model, tok, 256, bf16=dtype == "bfloat16").settings())
    dist.barrier()

    prompts = [[{"role": "user", "content": f"question {i} " * (i + 1)}] for i in range(7)]
    answers = [f"answer {i} " * (7 - i) for i in range(7)]
    mine = range(0, 5) if rank == 0 else range(5, 7)
    p, a = [prompts[i] for i in mine], [answers[i] for i in mine]

    want_dtype = getattr(torch, dtype)
    assert ScorerSettings.load(rm_dir).dtype == dtype
    sharded = RewardScorer.from_pretrained(rm_dir, zero3=ZERO3)
    params = list(sharded.model.parameters())
    partitioned = all(
        hasattr(x, "ds_id") and x.numel() == 0 and x.ds_tensor.numel() < x.ds_numel and x.ds_tensor.dtype == want_dtype
        for x in params
    )
    got = sharded.score(p, a, batch_size=2)
    whole = RewardScorer.from_pretrained(rm_dir)  # loads whole: the partitioned load unregistered its config
    whole_is_whole = not any(hasattr(x, "ds_id") for x in whole.model.parameters())
    want = whole.score(p, a, batch_size=2)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: the same weights; reductions may group differently
    match = whole_is_whole and torch.allclose(got, want, atol=tol, rtol=tol)
    if not match:
        print(f"rank {rank}: partitioned {got.tolist()} whole {want.tolist()}", flush=True)
    flags = torch.tensor([int(partitioned), int(match)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    dist.barrier()
    if rank == 0:
        words = [w for w, ok in zip(("partitioned", "scores_match"), flags.tolist()) if ok]
        Path(out).write_text(" ".join(words) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "bfloat16" if sys.argv[3:] == ["bf16"] else "float32")
