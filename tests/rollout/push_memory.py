"""Peak extra memory of a weight push into an in-process vLLM engine, for
test_weights.py::test_streamed_push_holds_about_one_layer. Prints JSON.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/rollout/push_memory.py WORK_DIR

Builds a 16-layer Llama (hidden 512: 15.7 MB of fp32 weights a layer, 252 MB in all) with the tiny
byte-level tokenizer, starts the engine on it, then pushes perturbed weights twice: streamed
(`VLLMEngine.update_weights`) and, for contrast, as one whole state dict (`hf_state_dict`, the route
the push used before it streamed). Each peak is VmHWM after a reset (/proc/self/clear_refs) minus the
resident set just before the push; the fixed mmap threshold makes glibc return freed blocks, so the
resident set follows the live tensors.
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def build(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def main(work: str) -> None:
    import torch

    from align.config import RolloutConfig
    from align.models import load_causal_lm
    from rollout import make_engine
    from rollout.weights import hf_state_dict

    model_dir = Path(work) / "model"
    build(model_dir)
    engine = make_engine(RolloutConfig(kv_cache_gib=1, max_model_len=256, in_process=True), model_dir, dtype="float32")
    try:
        policy = load_causal_lm(model_dir, "float32")
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        model_bytes = sum(p.numel() * 4 for p in policy.parameters())
        layer_bytes = sum(p.numel() * 4 for p in policy.model.layers[0].parameters())

        before = reset_peak()
        engine.update_weights(policy)
        stream = status("VmHWM") - before

        before = reset_peak()
        state = hf_state_dict(policy, dtype=torch.float32)
        engine.llm.collective_rpc("rollout_reload_weights", kwargs={"weights_iterator": list(state.items())})
        del state
        whole = status("VmHWM") - before
    finally:
        engine.close()
    print(json.dumps({"stream": stream, "whole": whole, "model_bytes": model_bytes, "layer_bytes": layer_bytes}))
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
