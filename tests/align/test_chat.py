"""Answer-only loss masks, checked token by token on real chat templates."""

import pytest

from align.chat import prompt_ids, tokenize_chat

CHAT = [
    {"role": "system", "content": "Be brief.", "train": False},
    {"role": "user", "content": "Hi there", "train": False},
    {"role": "assistant", "content": "Hello! How can I help?", "train": True},
    {"role": "user", "content": "What is 2+2?", "train": False},
    {"role": "assistant", "content": "4", "train": True},
]


def _trained_text(tok, t):
    return tok.decode([i for i, m in zip(t.input_ids, t.loss_mask) if m])


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_mask_covers_exactly_the_answers_and_their_stop_token(which, tiny_tok, smol_dir):
    from align.models import load_tokenizer

    tok = tiny_tok if which == "tiny" else load_tokenizer(smol_dir)
    t = tokenize_chat(tok, CHAT, 1024)
    assert t is not None and not t.truncated
    assert _trained_text(tok, t) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # Token by token: every masked-out token is outside the answers; the two trained runs are contiguous.
    runs, prev = [], False
    for i, m in enumerate(t.loss_mask):
        if m and not prev:
            runs.append([i, i])
        if m:
            runs[-1][1] = i
        prev = m
    assert len(runs) == 2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for start, end in runs:
        assert t.input_ids[end] == im_end  # the stop token is trained
        # the token before each answer is the newline closing the "<|im_start|>assistant\n" header
        assert tok.decode(t.input_ids[max(0, start - 12) : start]).endswith("assistant\n")
    # Full text is the tokenizer's own rendering.
    assert tok.decode(t.input_ids) == tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in CHAT], tokenize=False
    )


def test_untrained_assistant_turn_has_no_loss(tiny_tok):
    chat = [dict(m) for m in CHAT]
    chat[2]["train"] = False
    t = tokenize_chat(tiny_tok, chat, 1024)
    assert _trained_text(tiny_tok, t) == "4<|im_end|>"


def test_truncation_cuts_at_a_turn_boundary(tiny_tok):
    full = tokenize_chat(tiny_tok, CHAT, 1024)
    first = tokenize_chat(tiny_tok, CHAT[:3], 1024)
    # The last answer ends one token (a newline) before the end; two tokens short it no longer fits.
    t = tokenize_chat(tiny_tok, CHAT, len(full.input_ids) - 2)
    assert t.truncated
    assert t.input_ids == first.input_ids[: len(t.input_ids)]
    assert _trained_text(tiny_tok, t) == "Hello! How can I help?<|im_end|>"


def test_no_answer_fits_returns_none(tiny_tok):
    assert tokenize_chat(tiny_tok, CHAT, 10) is None


def test_prompt_ids_end_with_generation_prompt(tiny_tok):
    ids = prompt_ids(tiny_tok, [{"role": "user", "content": "Hi"}])
    assert tiny_tok.decode(ids).endswith("<|im_start|>assistant\n")
