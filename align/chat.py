"""Chat tokenisation with a per-token loss mask (`loss_mask`: True = trained on).

Used by SFT, rejection sampling and GAtt. The mask is derived from the tokenizer's own chat template:
an assistant turn's trained span runs from the end of the rendered prefix *with* the generation
prompt to the end of that turn's rendering (its content and end-of-turn token), so whatever the
template writes around a turn, only the answer and its stop token carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.errors import AlignError


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[bool]  # True = this token is trained on (an answer token of a `train` turn)
    truncated: bool  # later turns were dropped to fit max_length


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its trained answer turns."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("train", True):
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(head):
            raise AlignError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation, so answer tokens cannot be located; use a template such as ChatML"
            )
        end = len(upto.rstrip())  # the end-of-turn token is trained; the whitespace after it is not
        spans.append((len(head), end))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> TokenizedChat | None:
    """Token ids and loss mask of a conversation; None when no trained token fits in `max_length`.

    Conversations longer than `max_length` are cut at the end of the last trained turn that fits, so
    a sample never ends in the middle of an answer.
    """
    text, spans = trained_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [False] * len(ids)
    turn_ends = []  # token index one past each trained turn
    j = 0
    for start, end in spans:
        while j < len(ids) and offsets[j][0] < start:
            j += 1
        while j < len(ids) and offsets[j][0] < end:
            mask[j] = True
            j += 1
        turn_ends.append(j)
    if len(ids) <= max_length:
        return TokenizedChat(ids, mask, False) if any(mask) else None
    fitting = [e for e in turn_ends if e <= max_length]
    if not fitting:
        return None
    cut = fitting[-1]
    return TokenizedChat(ids[:cut], mask[:cut], True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt conversation followed by the assistant generation prompt."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
