"""Every consumer of a trained RM scores with the settings saved beside it (model/scorer.json)."""

from types import SimpleNamespace

import pytest
import torch

from reward.model import ScorerSettings, chat_template_sha, load_reward_model, save_reward_model


@pytest.fixture(scope="module")
def run_with_rms(tmp_path_factory, tiny_dir, tiny_tok):
    """A run directory with two saved RMs whose scorer.json differ (lengths 96 and 80, bf16 and fp32)."""
    run = tmp_path_factory.mktemp("run")
    for seed, name, settings in (
        (1, "rm_helpful", ScorerSettings(96, "bfloat16", chat_template_sha=chat_template_sha(tiny_tok))),
        (2, "rm_safety", ScorerSettings(80, "float32", chat_template_sha=chat_template_sha(tiny_tok))),
    ):
        torch.manual_seed(seed)
        save_reward_model(load_reward_model(tiny_dir, tiny_tok), tiny_tok, run / name / "model", settings)
    return run


def test_rejection_sampling_and_ppo_load_each_rm_as_it_trained(run_with_rms):
    from align.config import RewardUseConfig
    from align.rejection.score import load_reward_scorers

    ctx = SimpleNamespace(name="ppo", stage_dir=lambda stage: run_with_rms / stage)
    helpful, safety = load_reward_scorers(ctx, RewardUseConfig(helpful_rm="rm_helpful", safety_rm="rm_safety"))
    assert (helpful.max_length, helpful.bf16) == (96, True)
    assert (safety.max_length, safety.bf16) == (80, False)
    assert next(helpful.model.parameters()).dtype == torch.bfloat16


def test_align_rm_eval_reads_scorer_json(run_with_rms, tmp_path, make_pairs, capsys):
    import json

    from align.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n"
            for r in make_pairs(6)
        )
    )
    seen = []
    from reward import model as rm_model

    real = rm_model.RewardScorer.from_pretrained.__func__

    def spy(cls, path, max_length=None, bf16=None):
        scorer = real(cls, path, max_length, bf16)
        seen.append((scorer.max_length, scorer.bf16))
        return scorer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rm_model.RewardScorer, "from_pretrained", classmethod(spy))
        assert main(["rm", "eval", str(run_with_rms / "rm_safety" / "model"), str(data), "--format", "trl_jsonl"]) == 0
    assert seen == [(80, False)]
    assert "length-balanced" in capsys.readouterr().out
