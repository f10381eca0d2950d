"""rollout/types.py: validation, layout and padding of the rollout containers (no engine, no vLLM)."""

from __future__ import annotations

import sys

import pytest
import torch

from rollout.types import Rollouts, SamplingParams, Timing, derive_seed


def test_sampling_params_defaults_and_tuples():
    sp = SamplingParams(stop=["</s>", "\n\n"], stop_token_ids=[2, 7])
    assert sp.stop == ("</s>", "\n\n") and sp.stop_token_ids == (2, 7)
    assert not sp.greedy and SamplingParams(temperature=0).greedy
    assert hash(sp) == hash(SamplingParams(stop=("</s>", "\n\n"), stop_token_ids=(2, 7)))
    with pytest.raises(AttributeError):
        sp.n = 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_sampling_params_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def _rollouts(**over):
    fields = dict(
        prompt_ids=[[1, 2], [1, 2], [3], [3]],
        response_ids=[[5, 6, 7], [8], [9, 9], [4, 4, 4]],
        logprobs=[[-0.5, -1.0, -0.25], [-2.0], [-0.1, -0.2], [-1.0, -1.0, -1.0]],
        finish_reasons=["stop", "stop", "length", "length"],
        prompt_index=[0, 0, 1, 1],
        texts=["a", "b", "c", "d"],
        n=2,
        timing=Timing(2.0, 9),
    )
    fields.update(over)
    return Rollouts(**fields)


def test_rollouts_layout():
    r = _rollouts()
    assert len(r) == 4 and r.num_prompts == 2
    assert list(r.group(1)) == [2, 3]
    assert r.timing.tokens_per_s == 4.5
    assert Timing(0.0, 5).tokens_per_s == 0.0


def test_response_tensors_pad_and_mask():
    ids, lps, mask = _rollouts().response_tensors(pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0], [4, 4, 4]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True, True, False], [True] * 3]
    assert lps.dtype == torch.float32 and lps[1].tolist() == [-2.0, 0.0, 0.0]
    assert lps[0].tolist() == [-0.5, -1.0, -0.25]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"texts": ["a"]}, "texts has 1 rows"),
        ({"logprobs": [[-0.5], [-2.0], [-0.1, -0.2], [-1.0, -1.0, -1.0]]}, "row 0: 1 logprobs for 3"),
        ({"prompt_index": [0, 1, 1, 1]}, "row 1: prompt_index"),
        ({"finish_reasons": ["stop", "abort", "length", "length"]}, "'abort'"),
        ({"n": 3}, "multiple of n=3"),
    ],
)
def test_rollouts_rejects_inconsistent_rows(over, message):
    with pytest.raises(ValueError, match=message):
        _rollouts(**over)


def test_derive_seed():
    seeds = {derive_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500  # no collisions between nearby (seed, prompt) pairs
    assert derive_seed(3, 4) == derive_seed(3, 4)
    assert all(0 <= s < 2**62 for s in seeds)
    # vLLM seeds sample j with seed + j: neighbouring prompts must not share those streams
    assert all(abs(derive_seed(0, i) - derive_seed(0, i + 1)) > 64 for i in range(100))


def test_types_import_no_engine():
    import subprocess

    code = (
        "import rollout, rollout.types, rollout.base, sys; print('vllm' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_concat_joins_replica_slices_in_prompt_order():
    def part(prompts, n=2, seconds=1.0):
        rows = [(p, s) for p in prompts for s in range(n)]
        return Rollouts(
            prompt_ids=[[p] for p, _ in rows],
            response_ids=[[p, s, 2] for p, s in rows],
            logprobs=[[-0.1, -0.2, -0.3] for _ in rows],
            finish_reasons=["stop"] * len(rows),
            prompt_index=[r // n for r in range(len(rows))],
            texts=[f"{p}.{s}" for p, s in rows],
            n=n,
            timing=Timing(seconds, 3 * len(rows)),
        )

    whole = Rollouts.concat([part([10, 11], seconds=2.0), part([12], seconds=3.0)])
    assert whole.texts == ["10.0", "10.1", "11.0", "11.1", "12.0", "12.1"]
    assert whole.prompt_index == [0, 0, 1, 1, 2, 2] and whole.num_prompts == 3
    assert whole.timing == Timing(3.0, 18)  # the replicas ran side by side: the slowest one's time
    with pytest.raises(ValueError, match="must be equal"):
        Rollouts.concat([part([1], n=2), part([2], n=1)])
