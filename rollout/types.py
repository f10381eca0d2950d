"""What goes into an engine (`SamplingParams`) and what comes out (`Rollouts`).

Light on purpose: imports only torch (lazily, for `Rollouts.response_tensors`), never vLLM, so trainers
and losses can type against these without loading an engine.

Row layout (both engines): N prompts x n samples = B rows, grouped by prompt. Row r holds sample
`r % n` of prompt `prompt_index[r] == r // n`; rows `i*n .. i*n + n-1` all come from prompt i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Semantics are the same on every engine:

    - `temperature == 0` is greedy decoding (argmax); `n` greedy samples of a prompt are identical.
    - A row ends ("stop") at the first EOS token, any of `stop_token_ids`, or the first token whose
      decoded response contains one of `stop`; that token is kept in `response_ids` (so the
      trained-on sequence is exactly what the engine produced). Otherwise it ends ("length") after
      `max_new_tokens` tokens.
    - `seed` fixes the samples: the same prompts, params and seed give the same rows, whatever else
      ran before; prompt i uses a seed derived from (seed, i), so equal prompts in one call still
      get independent samples. `None` draws from the engine's running random state.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None
    # The index of this call's first prompt in a larger batch split over engines (replicas): prompt i
    # is seeded as prompt first_prompt + i, so the split samples what one engine would.
    first_prompt: int = 0

    def __post_init__(self):
        # Accept lists from callers but store tuples: the dataclass is frozen and hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be >= 1 sample per prompt")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed}: must be in [0, 2**63) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Timing:
    """Wall-clock cost of one `generate` call (tokenisation of chat prompts excluded)."""

    seconds: float
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Rollouts:
    """B = N prompts x n rows of generated responses, as ragged Python lists (exact lengths, no pad ids
    to mask by mistake); `response_tensors` pads them for a trainer.

    Fields (r = row, 0 <= r < B; L_r = len(response_ids[r]), 1 <= L_r <= max_new_tokens):
      prompt_ids[r]     list[int], P_r   the prompt's token ids (chat template applied), per row
      response_ids[r]   list[int], L_r   generated ids; ends with the EOS/stop token when finish_reasons[r] == "stop"
      logprobs[r]       list[float], L_r log p(response_ids[r][t] | prompt, response_ids[r][:t]) under the
                                         model's unmodified distribution (temperature 1, no top-p), i.e. what a
                                         trainer recomputes; aligned 1:1 with response_ids[r]
      finish_reasons[r] "stop" | "length"
      prompt_index[r]   int, = r // n    which input prompt the row answers
      texts[r]          str              response_ids[r] decoded, special tokens skipped
      n                 int              samples per prompt
      timing            Timing           seconds, generated tokens (sum of L_r) and tokens/s of the call
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    prompt_index: list[int]
    texts: list[str]
    n: int
    timing: Timing = field(default_factory=lambda: Timing(0.0, 0))

    def __post_init__(self):
        B = len(self.response_ids)
        for name in ("prompt_ids", "logprobs", "finish_reasons", "prompt_index", "texts"):
            if len(getattr(self, name)) != B:
                raise ValueError(f"Rollouts.{name} has {len(getattr(self, name))} rows, response_ids has {B}")
        if self.n < 1 or B % self.n:
            raise ValueError(f"Rollouts: {B} rows is not a multiple of n={self.n}")
        for r in range(B):
            if len(self.logprobs[r]) != len(self.response_ids[r]):
                raise ValueError(
                    f"Rollouts row {r}: {len(self.logprobs[r])} logprobs for "
                    f"{len(self.response_ids[r])} response tokens"
                )
            if self.prompt_index[r] != r // self.n:
                raise ValueError(f"Rollouts row {r}: prompt_index {self.prompt_index[r]} != r // n = {r // self.n}")
            if self.finish_reasons[r] not in ("stop", "length"):
                raise ValueError(
                    f"Rollouts row {r}: finish_reason {self.finish_reasons[r]!r} is not 'stop' or 'length'"
                )

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def concat(cls, parts: "Sequence[Rollouts]") -> "Rollouts":
        """The rollouts of consecutive slices of one prompt list (engine replicas), as one call's:
        rows in prompt order; timing: the slowest part's seconds, every part's tokens."""
        if not parts:
            raise ValueError("Rollouts.concat: no parts")
        n = parts[0].n
        if any(p.n != n for p in parts):
            raise ValueError(f"Rollouts.concat: parts sample {[p.n for p in parts]} responses a prompt; must be equal")

        def rows(name: str) -> list:
            return [x for p in parts for x in getattr(p, name)]

        B = sum(len(p) for p in parts)
        return cls(
            prompt_ids=rows("prompt_ids"),
            response_ids=rows("response_ids"),
            logprobs=rows("logprobs"),
            finish_reasons=rows("finish_reasons"),
            prompt_index=[r // n for r in range(B)],
            texts=rows("texts"),
            n=n,
            timing=Timing(max(p.timing.seconds for p in parts), sum(p.timing.generated_tokens for p in parts)),
        )

    @property
    def num_prompts(self) -> int:
        return len(self) // self.n

    def response_tensors(self, pad_id: int):
        """Right-padded tensors for a trainer, T = max_r L_r:

        response_ids  (B, T) long   pad_id after each row's end
        logprobs      (B, T) float32 0.0 after each row's end
        response_mask (B, T) bool   True = a generated token (trained on / scored)
        """
        import torch

        B = len(self)
        T = max((len(r) for r in self.response_ids), default=0)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        lps = torch.zeros((B, T), dtype=torch.float32)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for r, (toks, lp) in enumerate(zip(self.response_ids, self.logprobs)):
            ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            lps[r, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
            mask[r, : len(toks)] = True
        return ids, lps, mask

    def group(self, prompt: int) -> range:
        """Row indices of the n samples of prompt `prompt`."""
        return range(prompt * self.n, (prompt + 1) * self.n)


def derive_seed(seed: int, index: int) -> int:
    """A 62-bit seed for prompt `index` of a call seeded with `seed` (SplitMix64 finaliser).

    Hashing rather than `seed + index` keeps calls with nearby seeds from sharing random streams
    (vLLM gives sample j of a request the seed `seed + j`, so plain offsets would collide).
    """
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 2
