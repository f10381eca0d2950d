"""reward/model.py: tokenisation, pooling at the last real token, batched scoring, save/reload."""

import pytest
import torch

from align.config import LoraConfig
from align.errors import AlignError
from reward.model import (
    ADAPTER_SUBDIR,
    SCORER_FILE,
    RewardScorer,
    ScorerSettings,
    chat_template_sha,
    format_pair,
    load_reward_model,
    pad_batch,
    save_reward_model,
    sequence_scores,
    shared_prefix_batch,
    shared_prefix_scores,
)

PROMPTS = [[{"role": "user", "content": "hi" * k}] for k in range(1, 8)]
RESPONSES = ["Hello there. " * k for k in range(7, 0, -1)]


def _randomise_head(model, seed=0):
    # the new head is initialised near 0; make it large so score differences are well above float noise
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "score" in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def rm(tiny_dir, tiny_tok):
    torch.manual_seed(0)
    model = load_reward_model(tiny_dir, tiny_tok)
    _randomise_head(model)
    return model


def test_format_pair_is_the_chat_rendering_ending_at_end_of_turn(tiny_tok):
    enc = format_pair(tiny_tok, [{"role": "user", "content": "Hi", "train": False}], "Hello!", 512)
    text = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False
    ).rstrip()
    assert enc.input_ids == tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[-1] == tiny_tok.convert_tokens_to_ids("<|im_end|>")
    assert not enc.truncated


def test_format_pair_truncates_the_prompt_from_the_left(tiny_tok):
    prompt = [{"role": "user", "content": "a" * 200 + "THE END"}]
    enc = format_pair(tiny_tok, prompt, "Fine answer.", 64)
    text = tiny_tok.decode(enc.input_ids)
    assert len(enc.input_ids) == 64 and enc.prompt_truncated and not enc.response_truncated
    assert text.endswith("THE END<|im_end|>\n<|im_start|>assistant\nFine answer.<|im_end|>")


def test_format_pair_cuts_a_too_long_response_from_its_end(tiny_tok):
    enc = format_pair(tiny_tok, [{"role": "user", "content": "Q?"}], "start " + "x" * 300, 64)
    text = tiny_tok.decode(enc.input_ids)
    assert len(enc.input_ids) == 64 and enc.response_truncated
    assert "Q?<|im_end|>\n<|im_start|>assistant\nstart x" in text  # the prompt tail and the answer's start stay


def test_pad_batch_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_head_reads_the_last_real_token_with_right_padding(rm, tiny_tok):
    seqs = [format_pair(tiny_tok, p, r, 512).input_ids for p, r in zip(PROMPTS[:3], RESPONSES[:3])]
    ids, mask = pad_batch(seqs, tiny_tok.pad_token_id, "right")
    assert (ids == tiny_tok.pad_token_id).any()  # there is padding to get wrong
    with torch.no_grad():
        scores = sequence_scores(rm, ids, mask)
        hidden = rm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        last = mask.sum(-1) - 1
        manual = rm.score(hidden[torch.arange(len(seqs)), last])[:, 0]
    assert scores.tolist() == pytest.approx(manual.tolist(), abs=1e-5)


def test_batched_scores_equal_unbatched_and_keep_input_order(rm, tiny_tok):
    scorer = RewardScorer(rm, tiny_tok, max_length=512)
    batched = scorer.score(PROMPTS, RESPONSES, batch_size=3)
    one_by_one = torch.stack([scorer.score([p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)])
    assert batched.dtype == torch.float32 and batched.shape == (len(PROMPTS),)
    assert batched.std() > 1e-3  # the scores differ, so an order mix-up would show
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    left = RewardScorer(rm, tiny_tok, max_length=512, padding_side="left").score(PROMPTS, RESPONSES, batch_size=7)
    assert torch.allclose(left, one_by_one, atol=1e-5)


def test_save_and_reload_full_model(rm, tiny_tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    save_reward_model(rm, tiny_tok, tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert again.config.pad_token_id == tiny_tok.pad_token_id
    a = RewardScorer(rm, tiny_tok).score(PROMPTS, RESPONSES)
    b = RewardScorer(again, tiny_tok).score(PROMPTS, RESPONSES)
    assert torch.allclose(a, b, atol=1e-6)
    c = RewardScorer.from_pretrained(tmp_path).score(PROMPTS, RESPONSES)
    assert torch.allclose(a, c, atol=1e-6)


def test_a_user_loading_with_from_pretrained_gets_the_scorers_scores(rm, tiny_tok, tmp_path):
    """AutoModelForSequenceClassification + the saved tokenizer, padded as a user pads, reads the same
    last real token as RewardScorer (TRL issue 937: a head that read a pad token kept an RM near 60%)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    save_reward_model(rm, tiny_tok, tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [
        tok.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False).rstrip()
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert (batch["input_ids"] == tok.pad_token_id).any()  # the batch does hold pad tokens
    with torch.no_grad():
        theirs = model(**batch).logits[:, 0]
    ours = RewardScorer.from_pretrained(tmp_path).score(PROMPTS, RESPONSES, batch_size=3)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_scorer_settings_are_saved_with_the_model_and_read_back(rm, tiny_tok, tmp_path):
    settings = ScorerSettings(max_length=96, dtype="bfloat16", chat_template_sha=chat_template_sha(tiny_tok))
    save_reward_model(rm, tiny_tok, tmp_path / "a", settings)
    scorer = RewardScorer.from_pretrained(tmp_path / "a")
    assert scorer.settings() == settings == ScorerSettings.load(tmp_path / "a")
    assert scorer.max_length == 96 and scorer.bf16 and next(scorer.model.parameters()).dtype == torch.bfloat16
    assert RewardScorer.from_pretrained(tmp_path / "a", max_length=64, bf16=False).max_length == 64  # explicit wins
    save_reward_model(rm, tiny_tok, tmp_path / "b")  # no scorer.json: an RM saved by another tool
    assert RewardScorer.from_pretrained(tmp_path / "b").settings().max_length == 1024


def test_scorer_settings_refuse_a_changed_template_and_a_bad_file(rm, tiny_tok, tmp_path):
    save_reward_model(rm, tiny_tok, tmp_path, ScorerSettings(max_length=96, chat_template_sha="0" * 16))
    with pytest.raises(AlignError, match="chat template"):
        RewardScorer.from_pretrained(tmp_path)
    (tmp_path / SCORER_FILE).write_text('{"max_length": 96, "dtype": "float16"}')
    with pytest.raises(AlignError, match=f"{SCORER_FILE}.*dtype"):
        RewardScorer.from_pretrained(tmp_path)
    (tmp_path / SCORER_FILE).write_text("{not json")
    with pytest.raises(AlignError, match=f"{tmp_path / SCORER_FILE}: not a scorer settings file"):
        RewardScorer.from_pretrained(tmp_path)


def test_lora_head_trains_and_saves_merged_and_adapter(tiny_dir, tiny_tok, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = load_reward_model(tiny_dir, tiny_tok, lora=lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    _randomise_head(model)
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    want = RewardScorer(model, tiny_tok).score(PROMPTS, RESPONSES)
    save_reward_model(model, tiny_tok, tmp_path)
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert torch.allclose(RewardScorer(merged, tiny_tok).score(PROMPTS, RESPONSES), want, atol=1e-5)
    base = load_reward_model(tiny_dir, tiny_tok)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / ADAPTER_SUBDIR))
    assert torch.allclose(RewardScorer(adapted, tiny_tok).score(PROMPTS, RESPONSES), want, atol=1e-5)


def test_lora_with_a_bf16_base_keeps_trainables_in_float32(tiny_dir, tiny_tok):
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj",))
    model = load_reward_model(tiny_dir, tiny_tok, lora=lora, base_dtype="bfloat16")
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}


def test_shared_prefix_batch_layout_by_hand():
    # prefix [1, 2], chosen suffix [3], rejected suffix [4, 5]; a second pair that is identical (the
    # prefix is cut back so each side keeps one token of its own)
    b = shared_prefix_batch([([1, 2, 3], [1, 2, 4, 5]), ([7, 8], [7, 8])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 8, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 1, 0, 0]]
    assert b.chosen_end.tolist() == [2, 1] and b.rejected_end.tolist() == [4, 2]
    assert b.real_tokens == 5 + 3
    T, F = True, False
    assert b.attention_mask[0, 0].tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, T, T, F, F],
        [T, T, F, T, F],  # rejected: prefix and itself, not chosen
        [T, T, F, T, T],
    ]
    assert b.attention_mask[1, 0].tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, F, T, F, F],  # rejected [8] after prefix [7]
        [F, F, F, T, F],  # padding sees itself only
        [F, F, F, F, T],
    ]


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_scores_equal_separate_forwards(rm, tiny_dir, tiny_tok, lora):
    model = rm
    if lora:
        torch.manual_seed(1)
        model = load_reward_model(tiny_dir, tiny_tok, lora=LoraConfig(enabled=True, r=4, alpha=8))
        _randomise_head(model, seed=1)
    pairs = [
        (format_pair(tiny_tok, p, r, 512).input_ids, format_pair(tiny_tok, p, r2, 512).input_ids)
        for p, r, r2 in zip(PROMPTS, RESPONSES, RESPONSES[1:] + RESPONSES[:1])
    ]
    pairs.append(pairs[0][:1] * 2)  # chosen == rejected
    with torch.no_grad():
        c, r = shared_prefix_scores(model, shared_prefix_batch(pairs, tiny_tok.pad_token_id))
        ids, mask = pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], tiny_tok.pad_token_id)
        ref = sequence_scores(model, ids, mask)
    assert ref.std() > 0.1  # the scores differ: the comparison below means something
    torch.testing.assert_close(torch.cat([c, r]), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[-1], r[-1], atol=1e-5, rtol=1e-5)  # identical answers, identical scores


@pytest.mark.slow
def test_partitioned_scorer_on_two_processes_equals_the_whole_model(tmp_path):
    """`reward.shard` (PPO at 70B): each rank holds 1/2 of every weight, in the dtype the RM trained in
    (bf16 here, as on GPUs; fp32 runs in the 2-rank PPO test), the ranks score different numbers of
    batches (the one with fewer runs empty forwards so every gather has both ranks), and the scores
    equal the whole model's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "result.txt"
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(here / "sharded_score.py"),
            str(tmp_path / "rm"),
            str(out),
            "bf16",
        ],
        cwd=here.parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_text().split() == ["partitioned", "scores_match"], proc.stdout[-2000:]
