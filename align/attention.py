"""Variable-length causal attention for padding-free (packed) rows, on any device.

TRL's padding-free SFT batches (packing_strategy 'bfd') are ONE row holding every sequence of the
micro-batch back to back, with the boundaries given as ``cu_seq_lens_q`` (and position ids that restart
at each sequence). flash-attention-2 reads the boundaries; transformers' ``sdpa`` does not: it builds a
block-diagonal mask over the whole row and attends over T^2 positions, T being the whole micro-batch,
instead of sum(l_i^2). On the CPU (no flash-attention-2 there), with 8 rows of up to 512 tokens that
is a 4,096 x 4,096 attention per head and layer, and its backward is the slow part of a CPU step.

``VARLEN`` ('align_varlen') is an attention implementation registered with transformers: given the
boundaries it runs ``scaled_dot_product_attention(is_causal=True)`` once per sequence (the q/k/v of the
row split at the boundaries, so the backward is one concatenation); without them (a padded batch,
generation) it is transformers' sdpa unchanged. The masks are sdpa's, so every other input is handled
as before. Equal to sdpa with the block-diagonal mask (tests/align/test_attention.py).
"""

from __future__ import annotations

import torch

VARLEN = "align_varlen"


@torch.compiler.disable  # the split is data-dependent: a compiled layer (align.models.compile_layers) runs it eager
def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    **kwargs,
):
    """transformers' attention-function signature: query (1, H, T, D), key/value (1, Hkv, T, D) ->
    ((1, T, H, D), None); ``cu_seq_lens_q`` (= ``cu_seq_lens_k``): (n + 1,) int boundaries of the row's n
    causal sequences.

    The same per-pair split for the reward model's [prefix, chosen, rejected] rows (the rejected part
    attending to [prefix, rejected] under a small mask) was measured slower than sdpa's 4-D mask there
    (SmolLM2, 8 pairs of ~300 tokens, bf16: 4.95 against 4.46 s a step) and is not used.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_q, cu_seq_lens_k))
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    lengths = cu_seq_lens_q.diff().tolist()
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `VARLEN` with transformers (idempotent); returns its name for `set_attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    return VARLEN


def use_varlen(model) -> bool:
    """Switch a transformers model from sdpa to `VARLEN` (before any PEFT wrapping); other
    implementations (flash-attention-2 reads the boundaries itself, eager is asked for on purpose) are
    left alone. Returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True
