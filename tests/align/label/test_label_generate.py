"""Generating a labeling batch through the real transformers engine on the tiny model (no mocks)."""

from __future__ import annotations

import pytest

from align.config import DatasetSpec, RolloutConfig, SamplingConfig
from align.data.load import load_records
from align.label.generate import build_pairs, generate_round, select_prompts

ROLLOUT = RolloutConfig(engine="transformers", threads=1, max_model_len=512)
COLD, HOT = SamplingConfig(temperature=0.7, max_new_tokens=8), SamplingConfig(temperature=1.3, max_new_tokens=8)


@pytest.fixture(scope="module")
def prompts():
    records, _ = load_records(DatasetSpec(format="synthetic_prompts", limit=6), "prompt", ".")
    return records


def test_generate_round_stores_both_settings_and_the_samples_they_give(store, tiny_dir, prompts):
    from rollout import SamplingParams, make_engine

    out = generate_round(store, prompts, ROLLOUT, COLD, HOT, tiny_dir, dtype="float32", seed=3, assign_to=[])
    assert out["round"] == 1 and out["label/prompts"] == 6
    assert out["label/pairs"] + out["label/dropped_empty"] + out["label/dropped_identical"] == 6
    pairs = store.round_pairs(1)
    assert len(pairs) == out["label/pairs"] > 0
    for p in pairs:
        temps = {p["settings_a"]["temperature"], p["settings_b"]["temperature"]}
        assert temps == {0.7, 1.3} and p["settings_a"]["policy"] == str(tiny_dir)
        assert p["settings_a"]["engine"] == "transformers" and p["settings_a"]["max_new_tokens"] == 8
        i = p["settings_a"]["prompt_index"]
        assert p["prompt"] == prompts[i]["prompt"]
        assert p["category"] == ("safety" if prompts[i]["safety"] else "helpfulness")
    assert {p["category"] for p in pairs} == {"helpfulness", "safety"}  # synthetic_prompts tags every 4th
    # The stored settings reproduce the stored texts: sample again with them.
    with make_engine(ROLLOUT, tiny_dir, seed=3, dtype="float32") as engine:
        for side in ("a", "b"):
            s = pairs[0][f"settings_{side}"]
            again = engine.generate(
                [q["prompt"] for q in prompts],
                SamplingParams(
                    n=1,
                    temperature=s["temperature"],
                    top_p=s["top_p"],
                    max_new_tokens=s["max_new_tokens"],
                    seed=s["seed"],
                ),
            )
            for p in pairs:
                st = p[f"settings_{side}"]
                if st["temperature"] == s["temperature"]:
                    assert p[f"response_{side}"] == again.texts[st["prompt_index"]]
    # A second round samples new responses (the round is in the seed).
    out2 = generate_round(store, prompts, ROLLOUT, COLD, HOT, tiny_dir, dtype="float32", seed=3, assign_to=[])
    assert out2["round"] == 2
    first = {p["response_a"] for p in pairs} | {p["response_b"] for p in pairs}
    assert not first & (
        {p["response_a"] for p in store.round_pairs(2)} | {p["response_b"] for p in store.round_pairs(2)}
    )


def test_two_checkpoints_sample_one_side_each(store, tiny_dir, prompts):
    from align.models import tiny_model_dir

    other = tiny_model_dir(seed=1)
    out = generate_round(
        store,
        prompts[:3],
        ROLLOUT,
        COLD,
        COLD,
        tiny_dir,
        other,
        dtype="float32",
        seed=0,
        assign_to=[],
        names=("sft", "ppo"),
    )
    policies = [{p["settings_a"]["policy"], p["settings_b"]["policy"]} for p in store.round_pairs(out["round"])]
    assert policies and all(pol == {"sft", "ppo"} for pol in policies)


def test_build_pairs_shuffles_sides_and_leaves_out_unusable_pairs():
    prompts = [{"prompt": [{"role": "user", "content": f"q{i}"}], "safety": False, "source": "t"} for i in range(40)]
    a = [{"text": f"cold {i}", "finish_reason": "stop", "tokens": 3} for i in range(40)]
    b = [{"text": f"hot {i}", "finish_reason": "length", "tokens": 8} for i in range(40)]
    a[0]["text"] = "  "  # empty after stripping
    b[1]["text"] = a[1]["text"]  # identical
    pairs, dropped = build_pairs(prompts, a, b, {"temperature": 0.7}, {"temperature": 1.3}, seed=0)
    assert dropped == {"label/dropped_empty": 1, "label/dropped_identical": 1} and len(pairs) == 38
    shown_first = [p["settings_a"]["temperature"] for p in pairs]
    assert 0.7 in shown_first and 1.3 in shown_first  # neither setting is always shown as A
    for p in pairs:
        cold = p["response_a"] if p["settings_a"]["temperature"] == 0.7 else p["response_b"]
        assert cold.startswith("cold") and p["settings_a"]["finish_reason"] == (
            "stop" if p["response_a"] == cold else "length"
        )
    assert pairs == build_pairs(prompts, a, b, {"temperature": 0.7}, {"temperature": 1.3}, seed=0)[0]


def test_select_prompts_is_seeded_per_round():
    items = list(range(100))
    r1, r2 = select_prompts(items, 10, 0, 1), select_prompts(items, 10, 0, 2)
    assert len(r1) == 10 and r1 == sorted(r1) and r1 == select_prompts(items, 10, 0, 1) and r1 != r2
    assert select_prompts(items, 0, 0, 1) == items
