"""align/attention.py: per-sequence causal attention on padding-free rows equals sdpa's block-diagonal
mask (forward and gradients), and falls back to sdpa on padded batches."""

import torch

from align.attention import VARLEN, use_varlen
from align.models import load_causal_lm

LENGTHS = (7, 12, 5)


def _packed(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, sum(LENGTHS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def _models(tiny_dir):
    sdpa = load_causal_lm(tiny_dir, "float32")
    varlen = load_causal_lm(tiny_dir, "float32")
    assert use_varlen(varlen) and varlen.config._attn_implementation == VARLEN
    return sdpa, varlen


def test_packed_row_equals_block_diagonal_sdpa_and_separate_sequences(tiny_dir, monkeypatch):
    sdpa, varlen = _models(tiny_dir)
    ids, pos, cu = _packed(sdpa.config.vocab_size)
    # transformers builds the block-diagonal mask from the position ids (only without a cache, as TRL calls it)
    ref = sdpa(input_ids=ids, position_ids=pos, use_cache=False).logits
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k),
    )
    got = varlen(
        input_ids=ids,
        position_ids=pos,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(LENGTHS),
        max_length_k=max(LENGTHS),
    ).logits
    assert calls == list(LENGTHS) * sdpa.config.num_hidden_layers  # one causal call per sequence and layer
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    # ... and each sequence alone gives the same logits
    starts = cu.tolist()
    for s, e in zip(starts, starts[1:]):
        alone = sdpa(input_ids=ids[:, s:e]).logits
        assert torch.allclose(got[:, s:e], alone, atol=1e-5, rtol=1e-5)


def test_packed_row_gradients_equal_sdpa(tiny_dir):
    sdpa, varlen = _models(tiny_dir)
    ids, pos, cu = _packed(sdpa.config.vocab_size)
    sdpa(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
    varlen(
        input_ids=ids,
        position_ids=pos,
        labels=ids,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(LENGTHS),
        max_length_k=max(LENGTHS),
    ).loss.backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), varlen.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_padded_batch_falls_back_to_sdpa(tiny_dir):
    sdpa, varlen = _models(tiny_dir)
    ids = torch.randint(3, sdpa.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    a = sdpa(input_ids=ids, attention_mask=mask).logits
    b = varlen(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_trl_padding_free_batch_runs_per_sequence(tiny_dir, tiny_tok):
    """The batch TRL's collator builds for packed SFT carries the boundaries the varlen path reads."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sdpa, varlen = _models(tiny_dir)
    examples = [{"input_ids": list(range(10, 10 + n)), "seq_lengths": [n]} for n in LENGTHS]
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tok.pad_token_id, padding_free=True)(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "cu_seq_lens_q" in batch
    ref = sdpa(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
    ).loss
    got = varlen(**batch).loss
    assert torch.allclose(got, ref, atol=1e-6)
