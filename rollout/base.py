"""The engine interface every generation backend implements, and the prompt handling they share.

    with make_engine(cfg.rollout, model_dir, seed=cfg.seed, dtype=cfg.compute.dtype) as engine:
        rollouts = engine.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(n=4))
        engine.update_weights(policy)      # after an optimizer step

Both engines take the same prompts through the same code (`encode_prompts`), so a prompt is the same
token ids whichever engine samples it.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Mapping, Sequence, Union

from align.errors import AlignError
from rollout.types import Rollouts, SamplingParams, Timing

# A chat (list of {"role", "content"} messages; the chat template is applied with the generation
# prompt) or a list of token ids, used as is.
Prompt = Union[Sequence[Mapping[str, str]], Sequence[int]]


class Engine(abc.ABC):
    """Generates `Rollouts` from prompts; takes new policy weights without a restart.

    Subclasses implement `_generate`, `update_weights` and `_shutdown`. `close()` is idempotent and also
    runs on leaving a `with` block (normally, on an exception or on Ctrl-C).
    """

    name: str = "engine"

    def __init__(self, cfg, model_dir: str | Path, seed: int = 0, *, dtype: str):
        from align.models import load_tokenizer

        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"engine dtype={dtype!r}: must be 'bfloat16' or 'float32'")
        self.cfg = cfg
        self.dtype_name = dtype
        self.model_dir = Path(model_dir)
        self.seed = seed
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_dir)
        self.closed = False

    # ----------------------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams) -> Rollouts:
        """Sample `sampling.n` responses for each prompt; rows are grouped by prompt (see `Rollouts`)."""
        if self.closed:
            raise AlignError(f"{self.name} engine: generate() after close()")
        prompt_ids = self.encode_prompts(prompts, sampling)
        start = time.perf_counter()
        responses, logprobs, finish = self._generate(prompt_ids, sampling)
        from align.faults import fault

        fault("rollout")  # samples generated, not yet returned or stored
        seconds = time.perf_counter() - start
        n = sampling.n
        return Rollouts(
            prompt_ids=[list(prompt_ids[r // n]) for r in range(len(responses))],
            response_ids=responses,
            logprobs=logprobs,
            finish_reasons=finish,
            prompt_index=[r // n for r in range(len(responses))],
            texts=self.tokenizer.batch_decode(responses, skip_special_tokens=True),
            n=n,
            timing=Timing(seconds, sum(len(r) for r in responses)),
        )

    @abc.abstractmethod
    def _generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """(response_ids, logprobs, finish_reasons) for B = N x n rows grouped by prompt."""

    def encode_prompts(self, prompts: Sequence[Prompt], sampling: SamplingParams) -> list[list[int]]:
        """Token ids of each prompt: chats through the chat template (with the generation prompt),
        id lists as given. Fails on an empty batch, an empty prompt, or a prompt that leaves no
        room for `max_new_tokens` within `max_model_len`."""
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise AlignError(f"{self.name} engine: prompts must be a non-empty list of chats or token-id lists")
        out = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise AlignError(f"{self.name} engine: prompt {i} is empty")
            if all(isinstance(m, Mapping) for m in p):
                text = self.tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False).input_ids
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            else:
                raise AlignError(
                    f"{self.name} engine: prompt {i} is neither a chat (list of messages) "
                    f"nor a list of token ids: {str(p)[:80]}"
                )
            if len(ids) + sampling.max_new_tokens > self.cfg.max_model_len:
                raise AlignError(
                    f"{self.name} engine: prompt {i} has {len(ids)} tokens; with max_new_tokens="
                    f"{sampling.max_new_tokens} that exceeds rollout.max_model_len={self.cfg.max_model_len}. "
                    "Raise rollout.max_model_len or shorten/filter the prompts."
                )
            out.append(ids)
        return out

    # ------------------------------------------------------------------------------------ weights
    @abc.abstractmethod
    def update_weights(self, model) -> float:
        """Load `model`'s current weights (plain HF, PEFT LoRA or DeepSpeed ZeRO-3) into the engine;
        return the seconds it took. Under ZeRO-3 the ranks without an engine call
        `rollout.push_weights(None, model)` at the same time (the gather is collective)."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory until its next call (vLLM sleep mode on GPUs); a no-op
        where the engine has none to free. The next generate() or update_weights() wakes it."""

    # ----------------------------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Release the engine (its worker processes, memory). Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eos_token_ids(tokenizer, model_dir: Path) -> tuple[int, ...]:
    """Ids that end a response: the tokenizer's EOS and the model's generation_config EOS ids (vLLM
    stops on both, so the reference engine must too)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    cfg_path = model_dir / "generation_config.json"
    if cfg_path.is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        ids += eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))
