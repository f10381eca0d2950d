"""A reward model: a causal-LM backbone with its next-token head replaced by a scalar head.

Llama 2 (Touvron et al., 2023), sec. 3.2.2: both RMs start from a chat-model checkpoint; the
classification head for next-token prediction is replaced by a regression head that outputs a scalar.
Here that is `AutoModelForSequenceClassification(num_labels=1)` (LlamaForSequenceClassification for
Llama: a new bias-free `score` Linear), which reads the hidden state of the last token that is not
the pad token. The pad token must therefore be set in the config and never end a real sequence:
`align.models.load_tokenizer` pads with `<|endoftext|>`, which never occurs in a chat.

A sequence is ``chat_template(prompt + [assistant response])`` with trailing whitespace removed, so
the reward is read at the end-of-turn token (``<|im_end|>`` in ChatML).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from align.errors import AlignError
from align.io import read_json, write_json_atomic

ADAPTER_SUBDIR = "adapter"
SCORER_FILE = "scorer.json"
TRUNCATION = "prompt_left"  # `format_pair`: the prompt loses tokens from its left first, then the answer its end


# ---------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class EncodedResponse:
    """One prompt + response, tokenised for the reward model."""

    input_ids: list[int]
    prompt_truncated: bool  # tokens were dropped from the left of the prompt to fit max_length
    response_truncated: bool  # the response alone did not fit: tokens were dropped from its end

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.response_truncated


def _plain(messages: Sequence[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def format_pair(tokenizer, prompt_messages: Sequence[dict], response: str, max_length: int) -> EncodedResponse:
    """Token ids of ``prompt_messages`` followed by the assistant ``response``, at most ``max_length``.

    Long sequences are truncated, never dropped (TRL's RewardTrainer drops pairs longer than
    max_length; see PLATFORM.md). The prompt loses tokens from its LEFT first (the oldest turns and
    the system prompt go first, the last user turn and the assistant header stay), but keeps at least
    its last ``max_length // 4`` tokens; only if the response still does not fit is it cut from its
    end (so the RM sees the start of the answer). The caller counts ``truncated`` results.

    Args:
        tokenizer: a tokenizer with a chat template (e.g. from `align.models.load_tokenizer`).
        prompt_messages: the conversation up to and including the last user turn
            (``[{"role", "content"}]``; extra keys are ignored).
        response: the final assistant answer.
        max_length: the most tokens of the result.

    Returns:
        EncodedResponse with ``len(input_ids) <= max_length``.
    """
    if max_length < 8:
        raise AlignError(f"max_length={max_length}: too short for a prompt and a response (use >= 8)")
    messages = _plain(prompt_messages)
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    full = full.rstrip()  # read the reward at the end-of-turn token, not at whitespace after it
    if not full.startswith(head):
        raise AlignError(
            "the tokenizer's chat template does not render prompt + answer as the prompt with its "
            "generation prompt followed by the answer; use a template such as ChatML"
        )
    # The template writes the special tokens as text, so no extra BOS/EOS is added.
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(response_ids) <= max_length:
        return EncodedResponse(prompt_ids + response_ids, False, False)
    prompt_keep = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 4))
    prompt_part = prompt_ids[len(prompt_ids) - prompt_keep :]
    response_part = response_ids[: max_length - len(prompt_part)]
    return EncodedResponse(
        prompt_part + response_part, len(prompt_part) < len(prompt_ids), len(response_part) < len(response_ids)
    )


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into a batch.

    Returns:
        input_ids: (B, T) long, T = the longest sequence.
        attention_mask: (B, T) long, 1 = a real token.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: must be 'right' or 'left'")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError("an empty sequence cannot be scored")
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@dataclass(frozen=True)
class SharedPrefixBatch:
    """Preference pairs packed one per row as ``[shared prefix, chosen suffix, rejected suffix]``.

    Chosen and rejected answer the same prompt, so their token sequences share a prefix (the prompt
    and the assistant header). Forwarding it once instead of twice saves its tokens: on the shared
    HH harmless pairs with SmolLM2's template the prefix averages 132 tokens and the answers 55 and 64,
    so a pair costs 250 tokens instead of 2 x 196 (before padding). The rejected suffix must not see
    the chosen one: a 4-D mask lets each suffix attend to the prefix and to itself (causally), and the
    rejected suffix's positions restart where the prefix ends, so both suffixes get exactly the
    attention and rotary positions of their own unpacked sequence.

    Shapes (B pairs, T = the longest row):
        input_ids: (B, T) long, right-padded with the pad id.
        position_ids: (B, T) long.
        attention_mask: (B, 1, T, T) bool, True = the query (row) may attend to the key (column). A pad
            position attends to itself only, so no attention row is empty (an empty row gives NaN).
        chosen_end, rejected_end: (B,) long, the index of each response's last token (the reward is
            read there, as `sequence_scores` reads it at the last real token).
        real_tokens: tokens that are not padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen_end: torch.Tensor
    rejected_end: torch.Tensor
    real_tokens: int

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.attention_mask.to(device),
            self.chosen_end,
            self.rejected_end,
            self.real_tokens,
        )


def shared_prefix_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens of the two sequences' common prefix, leaving each at least one token of its own."""
    limit = min(len(chosen), len(rejected)) - 1
    p = 0
    while p < limit and chosen[p] == rejected[p]:
        p += 1
    return p


def shared_prefix_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> SharedPrefixBatch:
    """Pack (chosen_ids, rejected_ids) pairs into a `SharedPrefixBatch`.

    The prefix is the longest common prefix of the two sequences, shortened where needed so that each
    suffix keeps at least one token (a response identical to, or a prefix of, the other).
    """
    rows, spans = [], []
    for chosen, rejected in pairs:
        if not chosen or not rejected:
            raise ValueError("an empty sequence cannot be scored")
        p = shared_prefix_length(chosen, rejected)
        c, r = len(chosen) - p, len(rejected) - p
        rows.append(list(chosen) + list(rejected[p:]))
        spans.append((p, c, r))
    width = max(len(row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, (row, (p, c, r)) in enumerate(zip(rows, spans)):
        n = p + c + r
        ids[i, :n] = torch.as_tensor(row, dtype=torch.long)
        pos[i, : p + c] = torch.arange(p + c)
        pos[i, p + c : n] = torch.arange(p, p + r)
        m = causal[:n, :n].clone()
        m[p + c :, p : p + c] = False  # the rejected suffix does not see the chosen one
        mask[i, 0, :n, :n] = m
        mask[i, 0, torch.arange(n, width), torch.arange(n, width)] = True  # padding: itself only
    return SharedPrefixBatch(
        ids,
        pos,
        mask,
        chosen_end=torch.tensor([p + c - 1 for p, c, _ in spans]),
        rejected_end=torch.tensor([p + c + r - 1 for p, c, r in spans]),
        real_tokens=sum(p + c + r for p, c, r in spans),
    )


SHARED_PREFIX_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask


def _hf_model(model):
    """The transformers model inside a plain, PEFT- or DeepSpeed-wrapped reward model."""
    net = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def _attn_implementation(model) -> str:
    return getattr(_hf_model(model).config, "_attn_implementation", "sdpa")


def score_head(model) -> torch.nn.Module:
    """The scalar head (`score`) of a sequence-classification model, plain, PEFT- or DeepSpeed-wrapped."""
    net = _hf_model(model)
    head = getattr(net, "score", None)
    if head is None:
        raise AlignError(
            f"{type(net).__name__} has no `score` head; a reward model is an AutoModelForSequenceClassification"
        )
    return head


def shared_prefix_scores(model, batch: SharedPrefixBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards (chosen (B,), rejected (B,), float32) of a `SharedPrefixBatch` in one forward.

    The model's own pooling reads one position per row; the head's per-position output is taken from
    a forward hook on it instead (it works through PEFT and under DeepSpeed ZeRO-3, where the head's
    weights exist only inside the model's forward).
    """
    captured = []
    handle = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        mask = batch.attention_mask
        if _attn_implementation(model) == "eager":
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)
    finally:
        handle.remove()
    logits = captured[-1][..., 0]  # (B, T)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (
        logits[rows, batch.chosen_end.to(logits.device)].float(),
        logits[rows, batch.rejected_end.to(logits.device)].float(),
    )


def supports_shared_prefix(model) -> bool:
    """Whether the model's attention takes the 4-D mask of `shared_prefix_batch` (flash attention does not)."""
    return _attn_implementation(model) in SHARED_PREFIX_ATTENTION


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw reward of each sequence: the scalar head at its last real token.

    Position ids are derived from the attention mask, so left and right padding give the same
    positions for the real tokens (and the same scores).

    Args:
        model: a sequence-classification model with one label (plain or PEFT-wrapped).
        input_ids: (B, T) long.
        attention_mask: (B, T), 1 = a real token.

    Returns:
        (B,) float32 raw rewards.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, 0].float()


# ---------------------------------------------------------------------------------------------------
# Loading and saving


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _partitioned_reward_model(path: str | Path, tokenizer, ds_config: dict):
    """A DeepSpeed engine over the reward model at `path`, its weights partitioned by ZeRO-3 as they load
    (an `HfDeepSpeedConfig` of `ds_config` is registered with transformers for the load only). No
    optimizer: the engine is here for the hooks that gather each layer in the forward."""
    import deepspeed
    import transformers.integrations.deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref  # a config registered before (a policy's) is put back after
    before = ref() if ref is not None else None
    registered = hf_ds.HfDeepSpeedConfig(ds_config)  # noqa: F841  (from_pretrained partitions while it lives)
    try:
        # float32 as loaded: ZeRO-3's Init casts each partition to the config's dtype (bf16 when enabled)
        model = load_reward_model(path, tokenizer)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    finally:
        if before is not None:
            hf_ds.set_hf_deepspeed_config(before)
        else:
            hf_ds.unset_hf_deepspeed_config()
    return engine


def load_reward_model(path: str | Path, tokenizer, lora=None, base_dtype: str = "float32"):
    """A reward model from a causal-LM or reward-model directory, optionally wrapped with LoRA.

    Args:
        path: HF directory (a chat/SFT checkpoint: the `score` head is new and random; or a saved RM).
        tokenizer: its tokenizer; its pad token becomes the model's ``pad_token_id`` (the head reads
            the last non-pad token).
        lora: an `align.config.LoraConfig` with ``enabled`` True to train LoRA adapters (PEFT
            ``task_type="SEQ_CLS"``; the `score` head is trained in full via ``modules_to_save``),
            or None / disabled for full fine-tuning.
        base_dtype: dtype of the weights as loaded. With LoRA, ``bfloat16`` keeps the frozen base in
            bf16 while the adapters and the head stay float32.

    Returns:
        The model (a `PeftModelForSequenceClassification` with LoRA), in eval mode.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if tokenizer.pad_token_id is None:
        raise AlignError(f"{path}: the tokenizer has no pad token; load it with align.models.load_tokenizer")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new `score` head is reported as MISSING: expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=_dtype(base_dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        from align.models import peft_lora_config

        layers = model.config.num_hidden_layers
        model = get_peft_model(model, peft_lora_config(lora, layers, "SEQ_CLS", modules_to_save=["score"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters and the head train in float32 whatever the base dtype
        if not any(p.requires_grad for n, p in model.named_parameters() if "score" in n):
            raise AlignError("LoRA reward model: the score head is not trainable (modules_to_save failed)")
    elif base_dtype != "float32":
        raise AlignError(
            f"base_dtype={base_dtype}: full fine-tuning keeps float32 weights (bf16 runs as "
            "autocast); a bf16 base is only for LoRA, where the base is frozen"
        )
    model.eval()
    return model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def chat_template_sha(tokenizer) -> str:
    """A short hash of the tokenizer's chat template: a scorer refuses a tokenizer whose template changed."""
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScorerSettings:
    """How a reward model reads a (prompt, answer): saved beside it as ``scorer.json`` by the stage that
    trained it, and read by every consumer (rejection sampling, PPO, the eval stage, `align label auto`,
    `align rm eval`), so each scores exactly as the RM was trained."""

    max_length: int  # tokens of prompt + answer (`format_pair`)
    dtype: str = "float32"  # "bfloat16" | "float32": the precision the RM trained and scores in
    truncation: str = TRUNCATION  # which tokens go first when a pair is too long
    chat_template_sha: str = ""  # `chat_template_sha` of the tokenizer it trained with ("" = unchecked)

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise AlignError(f"{SCORER_FILE}: dtype {self.dtype!r} must be 'bfloat16' or 'float32'")
        if self.truncation != TRUNCATION:
            raise AlignError(
                f"{SCORER_FILE}: truncation {self.truncation!r} is not one this version reads ({TRUNCATION!r})"
            )
        if self.max_length < 8:
            raise AlignError(f"{SCORER_FILE}: max_length {self.max_length} must be >= 8")

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / SCORER_FILE
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> Optional["ScorerSettings"]:
        """The settings saved in ``model_dir``, or None for an RM saved elsewhere (e.g. by TRL)."""
        path = Path(model_dir) / SCORER_FILE
        if not path.is_file():
            return None
        try:
            return cls(**read_json(path))
        except (ValueError, TypeError, AlignError) as e:
            raise AlignError(
                f"{path}: not a scorer settings file ({e}); delete it to score with the defaults, "
                f"or retrain the reward model"
            ) from e


def save_reward_model(model, tokenizer, out_dir: str | Path, settings: Optional[ScorerSettings] = None) -> Path:
    """Write a reward model that reloads with ``AutoModelForSequenceClassification.from_pretrained``.

    Full fine-tuning: the model as is. LoRA: the adapter (with the trained `score` head) in
    ``out_dir/adapter/``, and the model with the adapter merged, in float32, in ``out_dir``. ``settings``
    go to ``out_dir/scorer.json``. The caller makes ``out_dir`` atomic (`align.io.atomic_dir`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        settings.save(out_dir)
    if is_peft(model):
        model.save_pretrained(str(out_dir / ADAPTER_SUBDIR))
        merged = copy.deepcopy(model).float().merge_and_unload()
        merged.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Scoring


class RewardScorer:
    """Batched scoring of (prompt, response) pairs with a reward model.

    Sequences are sorted by length so each batch pads little, scored under `torch.inference_mode`,
    and returned in input order.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int = 1024,
        bf16: bool = False,
        padding_side: str = "right",
        zero3_engine=None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bf16 = bf16
        self.padding_side = padding_side
        self.truncated = 0  # responses truncated so far (prompt or response side)
        # A DeepSpeed engine whose ZeRO-3 hooks gather each layer of the partitioned `model` in its forward
        # (`from_pretrained(zero3=...)`); every rank must then take part in every forward.
        self.zero3_engine = zero3_engine

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_length: Optional[int] = None,
        bf16: Optional[bool] = None,
        zero3: Optional[dict] = None,
    ) -> "RewardScorer":
        """A scorer for a saved reward model directory (its own tokenizer), with the settings of its
        ``scorer.json`` (`ScorerSettings`); an RM saved without one scores with 1,024 tokens in fp32.

        ``max_length`` / ``bf16`` override the saved settings (`align rm eval --max-length`). With bf16
        the weights are held in bf16 (scoring only, nothing trains): the matrix products are those of
        bf16 autocast, without casting every weight at every call (on a 2-core CPU with AMX,
        SmolLM2-135M, 16 sequences: 1.0-1.1 s a call against 1.4 s under autocast).

        ``zero3``: a DeepSpeed ZeRO-3 config (`align.launch.zero3.resolve_config`). The weights are then
        partitioned over the process group as they load, each rank holding 1/world of them, and every
        rank must call `score` together (a 70B RM does not fit one 80 GB GPU whole; docs/gpu.md).
        """
        from align.models import load_tokenizer

        settings = ScorerSettings.load(path)
        tok = load_tokenizer(path)
        if settings is not None and settings.chat_template_sha and settings.chat_template_sha != chat_template_sha(tok):
            raise AlignError(
                f"{Path(path) / SCORER_FILE}: the tokenizer's chat template in {path} is not the one "
                "the reward model trained with; restore its tokenizer files or retrain it"
            )
        if max_length is None:
            max_length = settings.max_length if settings is not None else 1024
        if bf16 is None:
            bf16 = settings.bf16 if settings is not None else False
        if zero3 is not None:
            engine = _partitioned_reward_model(path, tok, {**zero3, "bf16": {"enabled": bool(bf16)}})
            return cls(engine.module, tok, max_length=max_length, bf16=bf16, zero3_engine=engine)
        model = load_reward_model(path, tok)
        return cls(model.to(torch.bfloat16) if bf16 else model, tok, max_length=max_length, bf16=bf16)

    def settings(self) -> ScorerSettings:
        """The `ScorerSettings` this scorer reads with (saved beside a trained RM)."""
        return ScorerSettings(
            self.max_length, "bfloat16" if self.bf16 else "float32", chat_template_sha=chat_template_sha(self.tokenizer)
        )

    def response_tokens(self, responses: Sequence[str]) -> list[int]:
        """Each response's length in tokens (without the template's turn markers)."""
        return [len(ids) for ids in self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]]

    def encode(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = []
        for p, r in zip(prompts, responses):
            enc = format_pair(self.tokenizer, p, r, self.max_length)
            self.truncated += int(enc.truncated)
            out.append(enc.input_ids)
        return out

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Raw rewards of ``responses[i]`` to ``prompts[i]``.

        Args:
            prompts: N conversations up to the last user turn.
            responses: N assistant answers.
            batch_size: sequences per forward.

        Returns:
            (N,) float32 raw scores (before any sigmoid), in input order.
        """
        return self.score_ids(self.encode(prompts, responses), batch_size)

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
        """Raw rewards of already tokenised sequences: (N,) float32, in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        n = len(seqs)
        scores = torch.empty(n, dtype=torch.float32)
        order = sorted(range(n), key=lambda i: len(seqs[i]), reverse=True)
        batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
        device = next(self.model.parameters()).device
        # ZeRO-3's gathers write into the partitioned parameters, which inference mode forbids
        # (DeepSpeed under torch.inference_mode: snowflakedb/ArcticTraining#265), hence no_grad there.
        no_grad = torch.no_grad if self.zero3_engine is not None else torch.inference_mode
        missing = self._missing_forwards(len(batches), device)  # a collective: before any forward's gathers
        with no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for idx in batches:
                ids, mask = pad_batch([seqs[i] for i in idx], self.tokenizer.pad_token_id, self.padding_side)
                out = sequence_scores(self.model, ids.to(device), mask.to(device))
                scores[torch.tensor(idx)] = out.float().cpu()
            for _ in range(missing):
                one = torch.tensor([[self.tokenizer.pad_token_id]], device=device)
                sequence_scores(self.model, one, torch.ones_like(one))
        return scores

    def _missing_forwards(self, mine: int, device) -> int:
        """Partitioned (ZeRO-3): every rank takes part in every forward's gathers, so a rank with fewer
        batches than the busiest runs that many one-token forwards more. Whole: 0."""
        if self.zero3_engine is None:
            return 0
        import torch.distributed as dist

        count = torch.tensor([mine], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item()) - mine
