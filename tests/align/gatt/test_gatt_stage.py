"""The GAtt stage end to end on the tiny config."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_tiny_gatt_builds_trains_and_reports_recall(tmp_path):
    from transformers import AutoModelForCausalLM

    from align.config import load_config
    from align.gatt.instructions import Instruction
    from align.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", "stages=[sft,gatt]", "sft.train.max_steps=2"]
    )
    manifests = {m["stage"]: m for m in run_pipeline(cfg)}
    g, d = cfg.gatt, run_dir / "gatt"
    s = manifests["gatt"]["summary"]

    for when in ("before", "after"):
        for t in g.eval_turns:
            v = s[f"gatt/recall_{when}/turn{t}"]
            assert v is None or 0.0 <= v <= 1.0
    ev = json.loads((d / "eval.json").read_text())
    assert ev["n_dialogues"] == g.eval_dialogues and ev["turns"] == list(g.eval_turns)
    assert ev["repeats"] == g.eval_repeats == 2
    # every held-out dialogue answered turn 1, once per repeat
    assert ev["before"]["overall"]["1"]["n"] == g.eval_dialogues * g.eval_repeats
    rows = [json.loads(line) for line in (d / "eval_dialogues.jsonl").read_text().splitlines()]
    assert [r["repeat"] for r in rows] == [0] * g.eval_dialogues + [1] * g.eval_dialogues
    table = (d / "eval.md").read_text()
    assert "| Before GAtt |" in table and "| After GAtt |" in table and "Turn 6" in table

    dialogues = [json.loads(line) for line in (d / "dialogues.jsonl").read_text().splitlines()]
    assert len(dialogues) == g.num_dialogues
    assert all(len(x["answers"]) == g.turns for x in dialogues)
    # Every answer that keeps its instruction is trained (train_turns: all); broken turns are never
    # trained. The random model's answers rarely finish a sentence, so repair leaves many broken.
    kept = [k for x in dialogues for k in x["kept"]]
    assert s["gatt/data/sampled_samples"] == sum(k is not False for k in kept)
    # plus the program-made samples from the data's own answers
    assert s["gatt/data/reference_samples"] == g.reference_samples > 0
    assert s["gatt/data/samples"] == s["gatt/data/sampled_samples"] + g.reference_samples
    reference = [json.loads(line) for line in (d / "reference.jsonl").read_text().splitlines()]
    assert sum(m["train"] for r in reference for m in r["messages"]) == g.reference_samples
    assert s["gatt/data/sequences"] == len(reference) + sum(any(k is not False for k in x["kept"]) for x in dialogues)
    for r in reference:  # GAtt's form, with an instruction of the kinds asked for, which every answer keeps
        assert {p["kind"] for p in r["instruction"]["parts"]} <= set(g.reference_kinds)
        assert [m["train"] for m in r["messages"]] == [m["role"] == "assistant" for m in r["messages"]]
        inst = Instruction.from_dict(r["instruction"])
        assert inst.text in r["messages"][0]["content"]
        assert all(inst.keeps(m["content"]) for m in r["messages"] if m["role"] == "assistant")
    assert kept.count(True) > 0
    assert 0 < s["gatt/data/shortened_share"] < 1

    assert s["model_dir"] == str(d / "model") and s["train/steps"] == g.train.max_steps
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    init = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    assert any(not p.equal(q) for p, q in zip(model.parameters(), init.parameters()))


def test_evaluation_repeats_draw_their_own_instructions_and_keep_the_first_draw():
    from align.gatt.instructions import InstructionBank
    from align.gatt.stage import evaluation_draws

    bank = InstructionBank.load()
    held = [[f"q{i}.{t}" for t in range(3)] for i in range(10)]
    one_d, one_i = evaluation_draws(bank, held, 1, seed=7)
    three_d, three_i = evaluation_draws(bank, held, 3, seed=7)
    assert one_d == held and three_d == held * 3
    assert [i.text for i in three_i[:10]] == [i.text for i in one_i]  # repeats=1 is the draw of before
    kinds = [[i.parts[0].kind for i in three_i[r * 10 : (r + 1) * 10]] for r in range(3)]
    assert kinds[0] == kinds[1] == kinds[2]  # every repeat measures each kind equally often
    values = [[i.parts[0].value for i in three_i[r * 10 : (r + 1) * 10]] for r in range(3)]
    assert values[0] != values[1] and values[1] != values[2]  # but with its own values
    assert all(i.checkable and not i.shortened for i in three_i)
    assert evaluation_draws(bank, [], 3, seed=7) == ([], [])


def test_evaluation_budget_is_its_own():
    from align.config import load_config
    from align.gatt.stage import _sampling

    g = load_config(ROOT / "configs" / "tiny.yaml").gatt
    assert g.eval_max_new_tokens == 24 and g.sampling.max_new_tokens == 16
    assert _sampling(g, g.eval_max_new_tokens).max_new_tokens == 24  # what run_gatt evaluates with
    assert _sampling(g).max_new_tokens == 16  # the training dialogues
    assert _sampling(g, 0).max_new_tokens == 16  # 0 = the sampling budget


def test_split_dialogues_drops_held_out_openings_trained_on():
    from align.gatt.stage import split_dialogues

    loaded = [([f"u{i}", "more"], []) for i in range(12)] + [([f"u{i}", "other"], []) for i in range(6)]
    held, train, overlap = split_dialogues(loaded, 6, seed=0)
    plain_held, plain_train, none = split_dialogues(loaded, 6, seed=0, dedup=False)
    assert none == 0 and train == plain_train and len(plain_held) == 6
    openings = {users[0] for users, _ in train}
    assert overlap == sum(users[0] in openings for users in plain_held) > 0
    assert held == [users for users in plain_held if users[0] not in openings]
