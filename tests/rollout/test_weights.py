"""rollout/weights.py: the HF-named export of plain and PEFT models (no engine; ZeRO-3 is covered by
test_vllm_engine.py::test_zero3_two_process_push)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from align.errors import AlignError
from align.models import load_causal_lm
from rollout.weights import hf_state_dict


def _checkpoint_names(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


def test_plain_export_has_checkpoint_names_and_copies(tiny_dir):
    model = load_causal_lm(tiny_dir, "float32")
    state = hf_state_dict(model, dtype=torch.bfloat16)
    assert set(state) == _checkpoint_names(tiny_dir)  # tied lm_head appears once, as embed_tokens
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    ref = model.state_dict()
    assert all(torch.equal(state[k], ref[k].to(torch.bfloat16)) for k in state)
    state["model.norm.weight"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(state["model.norm.weight"].float(), model.model.norm.weight)


def test_lora_export_equals_merge_and_unload_and_leaves_model_alone(tiny_dir):
    pm = _lora(load_causal_lm(tiny_dir, "float32"))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    state = hf_state_dict(pm)
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    assert set(state) == _checkpoint_names(tiny_dir)
    worst = max((state[k] - merged[k]).abs().max().item() for k in state)
    assert worst < 1e-6
    # the adapters changed the pushed weights, not the model
    base = load_causal_lm(tiny_dir, "float32").state_dict()
    assert not torch.allclose(
        state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(state["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())


def test_lora_disabled_adapters_push_the_base(tiny_dir):
    pm = _lora(load_causal_lm(tiny_dir, "float32"))
    base = load_causal_lm(tiny_dir, "float32").state_dict()
    with pm.disable_adapter():
        state = hf_state_dict(pm)
    assert all(torch.equal(state[k], base[k]) for k in state)


def test_modules_to_save_exports_the_trained_copy(tiny_dir):
    pm = _lora(load_causal_lm(tiny_dir, "float32"), modules_to_save=["norm"])
    with torch.no_grad():
        pm.base_model.model.model.norm.modules_to_save["default"].weight.fill_(3.0)
    state = hf_state_dict(pm)
    assert set(state) == _checkpoint_names(tiny_dir)
    assert torch.equal(state["model.norm.weight"], torch.full_like(state["model.norm.weight"], 3.0))


def test_dora_is_refused(tiny_dir):
    pm = _lora(load_causal_lm(tiny_dir, "float32"), use_dora=True)
    with pytest.raises(AlignError, match="DoRA"):
        hf_state_dict(pm)


def test_keep_false_returns_none(tiny_dir):
    assert hf_state_dict(load_causal_lm(tiny_dir, "float32"), keep=False) is None


def test_stream_matches_state_dict_and_chunks_by_layer(tiny_dir):
    from rollout.weights import iter_hf_weights, layer_chunks, weight_names

    pm = _lora(load_causal_lm(tiny_dir, "float32"))
    whole = hf_state_dict(pm)
    streamed = list(iter_hf_weights(pm))
    assert [n for n, _ in streamed] == weight_names(pm) == list(whole)
    assert all(torch.equal(t, whole[n]) for n, t in streamed)
    chunks = [[n for n, _ in c] for c in layer_chunks(iter(streamed))]
    # the embeddings, each decoder layer whole, the final norm: 2 layers in the tiny model
    assert chunks[0] == ["model.embed_tokens.weight"] and chunks[-1] == ["model.norm.weight"]
    assert len(chunks) == 4
    assert all(n.startswith(f"model.layers.{i}.") for i, c in enumerate(chunks[1:-1]) for n in c)


@pytest.mark.slow
def test_streamed_push_holds_about_one_layer(tmp_path):
    """Measured: the extra resident memory of a streamed push into an in-process vLLM engine is a
    few decoder layers (the exporter's copy of one, vLLM's materialised copy while it loads it), not
    the model; the whole-state-dict route, measured the same way, holds the model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("push_memory.py")), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(m)
    assert m["whole"] >= 0.9 * m["model_bytes"]  # the measurement sees a whole copy when there is one
    assert m["stream"] <= 4 * m["layer_bytes"]  # 16 layers: a quarter of the model at most
    assert m["stream"] <= 0.25 * m["model_bytes"]
