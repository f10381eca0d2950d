"""Peak memory of two full fine-tuning steps (forward, backward, AdamW) on one CPU process, for
test_plan.py: prints JSON {"peak_bytes", "params"}.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/align/plan_measure.py MODEL_DIR MICRO_BATCH SEQ_LEN

The fixed mmap threshold makes glibc hand large blocks back on free, so the resident set follows the
live tensors; the peak is VmHWM after a reset (/proc/self/clear_refs) minus the resident set before
the model was loaded. One step of a throwaway one-layer model runs first, so the code and thread pools
that torch loads on its first forward, backward and AdamW step (tens of MB, more than the tiny test
model's tensors) are resident before the baseline: the estimate counts tensors, not libraries.
"""

import json
import sys


def rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def warm_up(torch) -> None:
    """One training step of a throwaway one-layer Llama on the same code path, then free it."""
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    del model, opt, ids
    gc.collect()


def main(model_dir: str, micro_batch: int, seq_len: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    warm_up(torch)
    base = rss("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set: the load's transient copies are not counted
    for _ in range(2):  # from the second step on, Adam's moments live beside the activations
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_bytes": rss("VmHWM") - base, "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
