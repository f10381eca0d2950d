"""The transformers reference engine on the tiny model: the Engine contract, against plain `generate`."""

from __future__ import annotations

import pytest
import torch

from align.config import RolloutConfig
from align.models import load_causal_lm
from rollout import SamplingParams, make_engine


@pytest.fixture(scope="module")
def engine(tiny_dir):
    with make_engine(RolloutConfig(engine="transformers", max_model_len=512), tiny_dir, dtype="float32") as e:
        yield e


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_causal_lm(tiny_dir, "float32").eval()


def test_layout_and_prompts(engine, checks):
    checks.check_layout(engine)


def test_logprobs_match_forward_pass(engine, model, checks):
    checks.check_logprobs_match(engine, model, tol=1e-5)


def test_greedy_matches_generate(engine, model, checks):
    checks.check_greedy_matches(engine, model)


def test_seeds(engine, checks):
    checks.check_seeds(engine)


def test_max_new_tokens(engine, checks):
    checks.check_max_tokens(engine)


def test_stop_strings(engine, checks):
    checks.check_stop_strings(engine)


def test_stop_token_ids(engine, checks):
    checks.check_stop_token_ids(engine)


def test_bad_prompts(engine, checks):
    checks.check_bad_prompts(engine)


def test_top_p_restricts_the_support(engine, model, checks):
    """top_p=1e-6 keeps only the most likely token: sampling becomes greedy."""
    sampled = engine.generate(checks.CHATS, SamplingParams(n=2, temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=0))
    greedy = engine.generate(checks.CHATS, SamplingParams(n=2, temperature=0, max_new_tokens=8))
    assert sampled.response_ids == greedy.response_ids


def test_update_weights_plain_and_lora(engine, tiny_dir, checks):
    new = checks.perturbed(load_causal_lm(tiny_dir, "float32"))
    try:
        engine.update_weights(new)
        checks.check_greedy_matches(engine, new)
        lora = checks.lora_wrapped(load_causal_lm(tiny_dir, "float32"))
        before = {k: v.clone() for k, v in lora.state_dict().items()}
        engine.update_weights(lora)
        checks.check_greedy_matches(engine, lora)
        # the push never merges into the training model
        assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())
    finally:
        engine.update_weights(load_causal_lm(tiny_dir, "float32"))
