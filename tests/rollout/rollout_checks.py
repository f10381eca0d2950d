"""Engine-agnostic checks of the `Engine` contract, run against both engines on the tiny model.

Imported by tests/rollout/test_vllm_engine.py and test_hf_engine.py (pytest puts this directory on
sys.path). The reference everywhere is the plain transformers model, never another engine.
"""

from __future__ import annotations

import torch

from rollout import SamplingParams

CHATS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "what is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name a colour"}],
]


def perturbed(model, scale: float = 0.1, seed: int = 1):
    """Add N(0, scale) noise to every matrix in place (embeddings included): enough to change the tiny
    model's greedy outputs (unperturbed it repeats one token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def lora_wrapped(model, seed: int = 2):
    """A PEFT LoRA (r=4, all linear projections) with non-zero A and B, so the adapters change outputs."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids) -> list[list[int]]:
    """transformers greedy decoding, one unpadded prompt at a time, cut after the first EOS."""
    out = []
    with torch.no_grad():
        for p in prompt_ids:
            x = torch.tensor([p])
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos_ids),
                pad_token_id=0,
            )[0, len(p) :].tolist()
            for t, tok in enumerate(y):
                if tok in eos_ids:
                    y = y[: t + 1]
                    break
            out.append(y)
    return out


def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt, response[:t]) from one full forward pass, fp32."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------ checks
def check_layout(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=0)
    r = engine.generate(CHATS, sp)
    assert len(r) == 9 and r.n == 3 and r.num_prompts == 3
    assert r.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for row in range(9):
        assert r.prompt_ids[row] == engine.encode_prompts([CHATS[row // 3]], sp)[0]
        assert len(r.logprobs[row]) == len(r.response_ids[row]) >= 1
        assert all(lp <= 0 for lp in r.logprobs[row])
        assert r.texts[row] == engine.tokenizer.decode(r.response_ids[row], skip_special_tokens=True)
    assert r.timing.generated_tokens == sum(map(len, r.response_ids)) and r.timing.seconds > 0
    # the chat template with the generation prompt, tokenised without extra special tokens
    text = engine.tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert r.prompt_ids[0] == engine.tokenizer(text, add_special_tokens=False).input_ids
    # token-id prompts are used as given and give the same rows as the chat they encode
    r_ids = engine.generate([r.prompt_ids[0], r.prompt_ids[3], r.prompt_ids[6]], sp)
    assert r_ids.response_ids == r.response_ids


def check_logprobs_match(engine, model, tol: float = 1e-4):
    """The engine's logprobs of its own sampled tokens equal the transformers model's (fp32)."""
    r = engine.generate(CHATS, SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3))
    worst = 0.0
    for row in range(len(r)):
        ref = hf_logprobs(model, r.prompt_ids[row], r.response_ids[row])
        worst = max(worst, (torch.tensor(r.logprobs[row]) - ref).abs().max().item())
    assert worst < tol, f"max |engine - transformers| logprob = {worst}"


def check_greedy_matches(engine, model, prompts=CHATS, max_new_tokens: int = 12) -> list[list[int]]:
    r = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=max_new_tokens))
    ref = hf_greedy(model, [r.prompt_ids[i] for i in range(0, len(r), 2)], max_new_tokens, engine.eos_token_ids)
    assert r.response_ids[0::2] == ref
    assert r.response_ids[1::2] == ref  # n greedy samples are identical
    return ref


def check_seeds(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7)
    prompts = [CHATS[0], CHATS[0], CHATS[1]]  # a repeated prompt must still get independent samples
    a = engine.generate(prompts, sp)
    b = engine.generate(prompts, sp)
    assert a.response_ids == b.response_ids and a.logprobs == b.logprobs
    c = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=8))
    assert c.response_ids != a.response_ids
    assert len({tuple(x) for x in a.response_ids}) == len(a)  # samples within a call differ
    # the same seed gives the same samples of a prompt whatever else is in the batch
    again = engine.generate([CHATS[0], CHATS[1]], sp)
    assert again.response_ids[:3] == a.response_ids[:3]
    u1 = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16))
    u2 = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16))
    assert u1.response_ids != u2.response_ids  # unseeded calls keep drawing new samples


def check_max_tokens(engine):
    r = engine.generate(CHATS, SamplingParams(n=4, temperature=1.0, max_new_tokens=5, seed=1))
    assert all(1 <= len(ids) <= 5 for ids in r.response_ids)
    assert "length" in r.finish_reasons
    for ids, reason in zip(r.response_ids, r.finish_reasons):
        if reason == "length":
            assert len(ids) == 5
        else:
            assert ids[-1] in engine.eos_token_ids


def _first_fresh(values: list, start: int):
    """Index >= start of the first value not seen before it in the list (None if there is none)."""
    for k in range(start, len(values)):
        if values[k] not in values[:k]:
            return k
    return None


def check_stop_strings(engine):
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=11)
    free = engine.generate(CHATS, sp)
    row = free.response_ids[0]
    chars = [engine.tokenizer.decode([t]) for t in row]
    printable = [c if len(c) == 1 and c.isascii() and c.isprintable() else None for c in chars]
    k = next(k for k in range(2, len(row)) if printable[k] and printable[k] not in "".join(chars[:k]))
    stop = printable[k]
    r = engine.generate(CHATS, SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=11, stop=(stop,)))
    # the same seed gives the same tokens up to the stop, which ends the row at its first occurrence
    assert r.response_ids[0] == row[: k + 1]
    assert r.finish_reasons[0] == "stop" and r.texts[0].endswith(stop)
    for ids, text, reason, full in zip(r.response_ids, r.texts, r.finish_reasons, free.response_ids):
        assert full[: len(ids)] == ids
        before = engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert stop not in before
        if reason == "stop" and ids[-1] not in engine.eos_token_ids:
            assert stop in text
        if reason == "length":
            assert stop not in text


def check_stop_token_ids(engine):
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=5)
    free = engine.generate(CHATS, sp)
    row = free.response_ids[1]
    k = _first_fresh(row, 2)
    tok = row[k]
    r = engine.generate(CHATS, SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=5, stop_token_ids=(tok,)))
    assert r.response_ids[1] == row[: k + 1] and r.finish_reasons[1] == "stop"
    for ids, reason, full in zip(r.response_ids, r.finish_reasons, free.response_ids):
        assert full[: len(ids)] == ids
        assert tok not in ids[:-1]
        assert (reason == "stop") == (ids[-1] == tok or ids[-1] in engine.eos_token_ids)


def check_bad_prompts(engine):
    import pytest

    from align.errors import AlignError

    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(AlignError, match="non-empty list"):
        engine.generate([], sp)
    with pytest.raises(AlignError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], sp)
    with pytest.raises(AlignError, match="neither a chat"):
        engine.generate([["hello"]], sp)
    with pytest.raises(AlignError, match="max_model_len"):
        engine.generate([[65] * engine.cfg.max_model_len], sp)
