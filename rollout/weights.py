"""Export a training model's weights as a plain HF state dict, the form every engine loads.

Handles a plain HF model, a PEFT LoRA model (adapters merged into the pushed tensors; the training
model is not modified) and a model sharded by DeepSpeed ZeRO-3 (gathered one module at a time).
`iter_hf_weights` streams the export module by module and `layer_chunks` groups it by decoder layer,
so the engine's push (rollout/vllm_engine.py) holds about one decoder layer's weights at a time, never
the model's; `hf_state_dict` collects the same stream into one dict. Names come out as HF checkpoint names
(`model.layers.0.self_attn.q_proj.weight`): PEFT prefixes `base_model.model.` and `.base_layer` are
stripped and `lora_*` tensors dropped after merging.

LoRA route, chosen by measurement (bench/rollout.py `--lora-bench`, SmolLM2-135M, r=16, all 7 linear
projections, 2 CPU cores): merging per layer with peft's own `get_delta_weight` (W + scale * B @ A in
fp32, then cast) takes about as long as exporting the plain model, while `merge_and_unload` on a
deep copy costs a full model copy more and cannot work on ZeRO-3 shards; see the report numbers in
`hf_state_dict`'s callers.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from align.errors import AlignError

PEFT_PREFIX = "base_model.model."


def unwrap(model):
    """The user module inside DeepSpeed / DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def is_zero3(model) -> bool:
    """True if DeepSpeed ZeRO-3 partitions the model's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gathered(params: list, zero3: bool):
    """Full parameters inside the block on every rank (ZeRO-3), read-only; a no-op otherwise.
    Every rank must enter it with the same parameters in the same order."""
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


def _clean(name: str) -> str:
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer", "")


def _peft_classes():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:  # peft absent: no model can be a PEFT model
        return (), (), (), ()
    return LoraLayer, BaseTunerLayer, ModulesToSaveWrapper, AuxiliaryTrainingWrapper


def _merged_lora_weight(layer, name: str) -> torch.Tensor:
    """W + sum over active adapters of scale * B @ A (peft's own delta: handles fan_in_fan_out,
    rsLoRA scaling and embeddings), in fp32. Reads the layer; never merges it in place."""
    weight = layer.get_base_layer().weight.detach().float()
    if layer.merged or layer.disable_adapters:
        # merged: the base weight already holds the adapters; disabled: the policy runs without them.
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise AlignError(f"{name}: DoRA adapters are not supported by the weight push; use plain LoRA")
        weight = weight + layer.get_delta_weight(adapter).detach().float()
    return weight


@dataclass(frozen=True)
class _Step:
    """One gather of the export: `params` gathered together (ZeRO-3), then `export()` reads them."""

    params: tuple
    names: tuple[str, ...]
    export: Callable[[], list[tuple[str, torch.Tensor]]]


def _plan(model) -> list[_Step]:
    """The export's steps in `named_modules` order, one module's own parameters each (a LoRA layer or
    a modules_to_save wrapper as a whole); reads names and module types only, no weight data, so it
    gathers nothing and every rank builds the same list."""
    LoraLayer, BaseTunerLayer, ModulesToSave, AuxWrapper = _peft_classes()
    steps: list[_Step] = []
    seen: set[int] = set()
    handled: set[str] = set()  # modules whose parameters were exported as a whole

    def inside_handled(name: str) -> bool:
        # Ancestors by name ("a", "a.b", ...): a set lookup each, where testing every handled prefix
        # cost 40% of a LoRA export (210 LoRA layers x ~1,000 modules; measured with cProfile).
        prefix = ""
        for part in name.split(".")[:-1]:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix in handled:
                return True
        return False

    for mname, module in model.named_modules():
        if inside_handled(mname):
            continue
        if LoraLayer and isinstance(module, LoraLayer):
            params = tuple(module.parameters())
            base = module.get_base_layer()
            names = (_clean(mname) + ".weight",) + (
                (_clean(mname) + ".bias",) if getattr(base, "bias", None) is not None else ()
            )

            def export(module=module, mname=mname, base=base, names=names):
                out = [(names[0], _merged_lora_weight(module, mname))]
                return out + ([(names[1], base.bias)] if len(names) > 1 else [])

            steps.append(_Step(params, names, export))
            seen.update(id(p) for p in params)
            handled.add(mname)
        elif ModulesToSave and isinstance(module, ModulesToSave):
            active = module.active_adapters
            src = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
            named = [(_clean(f"{mname}.{pn}"), p) for pn, p in src.named_parameters() if id(p) not in seen]
            steps.append(_Step(tuple(p for _, p in named), tuple(n for n, _ in named), lambda named=named: named))
            seen.update(id(p) for p in module.parameters())
            handled.add(mname)
        elif (AuxWrapper and isinstance(module, AuxWrapper)) or (BaseTunerLayer and isinstance(module, BaseTunerLayer)):
            raise AlignError(
                f"{mname}: {type(module).__name__} is not supported by the weight push "
                "(supported: LoRA layers and modules_to_save)"
            )
        else:
            named = [
                (_clean(f"{mname}.{pn}" if mname else pn), p)
                for pn, p in module.named_parameters(recurse=False)
                if id(p) not in seen
            ]
            if not named:
                continue
            steps.append(_Step(tuple(p for _, p in named), tuple(n for n, _ in named), lambda named=named: named))
            seen.update(id(p) for _, p in named)
    return steps


def weight_names(model) -> list[str]:
    """The HF names the export yields, in order, without touching (or gathering) any weight; raises
    if they could not load into an engine (unmerged adapter tensors, a separate tied lm_head)."""
    model = unwrap(model)
    names = [n for step in _plan(model) for n in step.names]
    leftover = [k for k in names if "lora_" in k or "modules_to_save" in k or "original_module" in k]
    if leftover:
        raise AlignError(f"weight export left adapter tensors unmerged: {leftover[:4]}")
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in names:
        # The engine ties lm_head to the embeddings and ignores lm_head.weight: refuse rather than
        # push weights that would be silently dropped (e.g. LoRA on a tied lm_head).
        raise AlignError(
            "the model ties lm_head to embed_tokens but exports a separate lm_head.weight "
            "(LoRA on lm_head?); drop lm_head from lora.target_modules"
        )
    return names


def iter_hf_weights(
    model, dtype: Optional[torch.dtype] = None, device: Optional[str | torch.device] = "cpu", keep: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the model's weights, one module's at a time: under ZeRO-3 each step
    gathers one module's parameters, copies them out (LoRA merged), releases the gather, then yields.
    A consumer that drops each tensor once loaded (vLLM's layerwise reload does, layer by layer) keeps
    about one decoder layer of extra memory alive, never the model's.

    Under ZeRO-3 every rank must run the iterator to its end, in step (the gathers are collective);
    ranks that do not push pass `keep=False` and get nothing. Tensors are fresh copies cast to
    `dtype` (None = keep) on `device` (None = the parameter's device)."""
    model = unwrap(model)
    weight_names(model)  # refuse before the first gather, identically on every rank
    zero3 = is_zero3(model)
    for step in _plan(model):
        with _gathered(list(step.params), zero3):
            if not keep:
                continue
            out = [
                (name, t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True))
                for name, t in step.export()
            ]
        yield from out
        del out


def hf_state_dict(
    model, dtype: Optional[torch.dtype] = None, device: Optional[str | torch.device] = "cpu", keep: bool = True
) -> Optional[dict[str, torch.Tensor]]:
    """The model's full weights as {HF name: tensor}, LoRA merged, cast to `dtype` (None = keep) and
    copied to `device` (None = the parameter's device); fresh tensors that alias no parameter. This
    holds the whole model at once: the engine's push streams `iter_hf_weights` instead.

    Under ZeRO-3 every rank must call this, in step (the gathers are collective); ranks that do not
    push (no engine) pass `keep=False`: they only take part in the gathers and get None. Tied
    parameters appear once (under the first name, e.g. `model.embed_tokens.weight`, not
    `lm_head.weight`), as in an HF checkpoint.
    """
    out = dict(iter_hf_weights(model, dtype=dtype, device=device, keep=keep))
    return out if keep else None


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_chunks(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive (name, tensor) pairs by decoder layer (`...layers.N.`); a weight outside the
    layers (embeddings, final norm, lm_head) is a chunk of its own. Consumes `items` lazily: one chunk
    is held at a time."""
    chunk: list[tuple[str, torch.Tensor]] = []
    key = None
    for name, t in items:
        m = LAYER.search(name)
        k = ("layer", int(m.group(1))) if m else ("other", name)
        if chunk and k != key:
            yield chunk
            chunk = []
        chunk.append((name, t))
        key = k
    if chunk:
        yield chunk
