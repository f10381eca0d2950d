"""Resumable sampling (a fake engine counts what it is asked) and the stage end to end on the tiny config."""

import json
import random
from pathlib import Path

import pytest

from align.rejection.sample import batch_path, sample_and_score
from rollout.types import Rollouts, SamplingParams

ROOT = Path(__file__).resolve().parents[3]


class FakeEngine:
    """Answers deterministically from (sampling seed, prompt text, sample index); records every call."""

    def __init__(self, fail_on_call=None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def generate(self, prompts, sampling):
        self.calls.append([p[-1]["content"] for p in prompts])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed mid-round")
        n = sampling.n
        texts = [
            f"{prompts[r // n][-1]['content']} #{r % n} {random.Random(f'{sampling.seed}/{r}').random():.6f}"
            for r in range(len(prompts) * n)
        ]
        return Rollouts(
            prompt_ids=[[1]] * len(texts),
            response_ids=[[7, 8]] * len(texts),
            logprobs=[[-0.1, -0.2]] * len(texts),
            finish_reasons=["stop"] * len(texts),
            prompt_index=[r // n for r in range(len(texts))],
            texts=texts,
            n=n,
        )


class FakeScorer:
    def __init__(self):
        self.scored = 0

    def __call__(self, prompts, responses, is_safety):
        self.scored += len(responses)
        h = [float(len(r) % 7) for r in responses]
        return {"score": h, "helpful_score": h, "safety_score": [0.0] * len(h), "safety_rm_used": list(is_safety)}


def _prompts(n):
    return [
        {
            "prompt_id": i,
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "safety": i % 3 == 0,
            "source": "test",
        }
        for i in range(n)
    ]


def test_interrupted_sampling_resumes_without_asking_the_engine_again(tmp_path):
    prompts, params = _prompts(10), SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    args = dict(sampling=params, batch_size=4, round_=1, seed=0)

    # Uninterrupted reference run.
    ref = sample_and_score(prompts, FakeEngine, FakeScorer, state_dir=tmp_path / "ref", **args)
    assert len(ref) == 30 and [r["prompt_id"] for r in ref[::3]] == list(range(10))

    # Killed during the second batch (prompts 4-7): only the first batch is on disk.
    state = tmp_path / "state"
    first = FakeEngine(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        sample_and_score(prompts, lambda: first, FakeScorer, state_dir=state, **args)
    assert batch_path(state, 0).is_file() and not batch_path(state, 1).exists()
    assert not list(state.glob(".*tmp*"))  # no half-written batch file left behind

    # The restart asks the engine for the unfinished prompts only, and gets the same samples.
    second, scorer = FakeEngine(), FakeScorer()
    got = sample_and_score(prompts, lambda: second, lambda: scorer, state_dir=state, **args)
    assert second.calls == [[f"question {i}" for i in range(4, 8)], ["question 8", "question 9"]]
    assert scorer.scored == 6 * 3
    assert got == ref

    # A third run finds every batch done and builds neither engine nor scorer.
    def boom():
        raise AssertionError("engine built although every batch is on disk")

    assert sample_and_score(prompts, boom, boom, state_dir=state, **args) == ref


def test_batch_seeds_differ_by_round_and_batch(tmp_path):
    from align.rejection.sample import batch_seed

    seeds = {batch_seed(0, r, b) for r in range(3) for b in range(5)}
    assert len(seeds) == 15
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2) != batch_seed(1, 1, 2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from align.config import load_config
    from align.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("rs") / "run"
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={run_dir}",
            "stages=[sft,rm_helpful,rm_safety,rejection_sampling]",
            "sft.train.max_steps=2",
            "rm_helpful.train.max_steps=3",
            "rm_safety.train.max_steps=3",
        ],
    )
    manifests = {m["stage"]: m for m in run_pipeline(cfg)}
    return cfg, run_dir, manifests


@pytest.mark.slow
def test_tiny_rejection_sampling_pools_trains_and_reports(tiny_run):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    cfg, run_dir, manifests = tiny_run
    rs = cfg.rejection_sampling
    d = run_dir / "rejection_sampling"
    s = manifests["rejection_sampling"]["summary"]
    n_prompts = 20 - rs.heldout_prompts
    assert s["data/prompts"] == n_prompts

    samples = load_dataset("json", data_files=str(d / "samples.jsonl"), split="train")
    assert len(samples) == rs.rounds * rs.k * n_prompts  # K samples of every prompt in every round
    for col in ("round", "score", "helpful_score", "safety_score", "response", "prompt"):
        assert col in samples.column_names
    pool = load_dataset("json", data_files=str(d / "pool.jsonl"), split="train")
    assert sorted(pool["prompt_id"]) == sorted(set(samples["prompt_id"]))  # one kept answer per prompt
    # Every kept answer is the best of all samples of its prompt, over both rounds.
    best = {}
    for pid, sc in zip(samples["prompt_id"], samples["score"]):
        best[pid] = max(best.get(pid, -1e9), sc)
    assert all(sc == pytest.approx(best[pid]) for pid, sc in zip(pool["prompt_id"], pool["score"]))
    assert set(pool["round"]) <= {1, 2}
    assert (d / "pool_round1.jsonl").is_file()
    # The pool spans rounds: some prompt keeps its round-1 answer over all of its (worse) round-2 samples.
    round2 = {}
    for pid, r, sc in zip(samples["prompt_id"], samples["round"], samples["score"]):
        if r == 2:
            round2[pid] = max(round2.get(pid, -1e9), sc)
    kept_r1 = [(pid, sc) for pid, r, sc in zip(pool["prompt_id"], pool["round"], pool["score"]) if r == 1]
    assert kept_r1 and all(sc >= round2[pid] for pid, sc in kept_r1)  # ties go to the earlier round

    # Best-of-N curves: K points per round, max rising with N, max >= median.
    for r in (1, 2):
        mx, md = s[f"rejection/round{r}/best_of_n_max"], s[f"rejection/round{r}/best_of_n_median"]
        assert len(mx) == rs.k and all(a <= b + 1e-9 for a, b in zip(mx, mx[1:]))
        assert all(a >= b - 1e-9 for a, b in zip(mx, md))
        assert mx[0] == pytest.approx(s[f"rejection/round{r}/sample_reward"])
    assert (d / "best_of_n.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((d / "best_of_n.json").read_text())["rounds"]["2"]["max"] == pytest.approx(mx)

    # Held-out reward before and after, on the same prompts and seed.
    held = load_dataset("json", data_files=str(d / "heldout.jsonl"), split="train")
    assert held["policy"].count("before") == held["policy"].count("after") == rs.heldout_prompts * rs.eval_samples
    for key in ("rejection/reward_before", "rejection/reward_after"):
        assert isinstance(s[key], float) and s[key] == s[key]

    # A loadable fine-tuned checkpoint that differs from the init policy.
    assert s["model_dir"] == str(d / "model") and s["train/steps"] == rs.train.max_steps
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    init = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    moved = [n for (n, p), (_, q) in zip(model.named_parameters(), init.named_parameters()) if not p.equal(q)]
    assert moved


def test_sampler_resolves_policy_base_stage_and_directory(tmp_path):
    from types import SimpleNamespace

    from align.config import load_config
    from align.errors import AlignError
    from align.models import tiny_model_dir
    from align.rejection.stage import resolve_sampler

    def ctx(sampler):
        cfg = load_config(
            ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", f"rejection_sampling.sampler={sampler}"]
        )
        return SimpleNamespace(
            cfg=cfg,
            stage_cfg=cfg.rejection_sampling,
            init_model_dir=tmp_path / "sft" / "model",
            stage_dir=lambda name: tmp_path / name,
        )

    assert resolve_sampler(ctx("")) == tmp_path / "sft" / "model"
    assert resolve_sampler(ctx("base")) == tiny_model_dir()
    with pytest.raises(AlignError, match="has not finished"):
        resolve_sampler(ctx("sft"))
    (tmp_path / "sft" / "model").mkdir(parents=True)
    assert resolve_sampler(ctx("sft")) == tmp_path / "sft" / "model"
    assert resolve_sampler(ctx(str(tiny_model_dir()))) == tiny_model_dir()  # a teacher directory
    with pytest.raises(AlignError, match="no such directory"):
        resolve_sampler(ctx(str(tmp_path / "nowhere")))


def test_a_teacher_stage_must_run_before_rejection_sampling():
    from align.config import load_config
    from align.configlib import ConfigError

    with pytest.raises(ConfigError, match="needs the output of stage 'gatt'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rejection_sampling.sampler=gatt"])


@pytest.mark.parametrize("dedup", [True, False])
def test_load_prompts_counts_and_drops_duplicates(monkeypatch, dedup):
    from types import SimpleNamespace

    from align.config import DatasetSpec, load_config
    from align.data.dedup import prompt_key
    from align.rejection import stage as rejection_stage
    from align.rejection.stage import load_prompts

    monkeypatch.setattr(rejection_stage, "prompt_ids", lambda _tok, _messages: [1])  # every prompt fits
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.dedup={str(dedup).lower()}"])
    stage = cfg.stage("rejection_sampling")
    # synthetic_prompts draws 20 prompts from a few templates: some come twice
    spec = DatasetSpec(format="synthetic_prompts", limit=20)
    stage_cfg = SimpleNamespace(prompts=(spec,), sampling=stage.sampling, heldout_prompts=4)
    ctx = SimpleNamespace(cfg=cfg, stage_cfg=stage_cfg)
    train, held, stats = load_prompts(ctx, tokenizer=None)
    keys = [prompt_key(r) for r in train + held]
    assert stats["data/prompts"] == len(train) and len(held) == stats["data/heldout_prompts"] == 4
    assert stats["data/heldout_overlap_dropped"] == 0  # no copy of a prompt is left to overlap
    if dedup:
        assert stats["data/duplicates_dropped"] == 3 and len(keys) == len(set(keys)) == 17
    else:
        assert stats["data/duplicates_dropped"] == 0 and len(keys) == 20


@pytest.mark.parametrize("sampler, trained", [("", ["round1", "round2", "final"]), ("teacher", ["final"])])
def test_a_rank_other_than_0_trains_on_the_kept_sets_rank_0_publishes(tmp_path, monkeypatch, sampler, trained):
    """Rank 1 runs no engine: it trains each round's model on the kept set rank 0 leaves in the work
    directory, in rank 0's order (with a teacher, nothing before the last round)."""
    from types import SimpleNamespace

    import align.rejection.stage as stage
    from align.io import write_json_atomic

    ctx = SimpleNamespace(
        stage_cfg=SimpleNamespace(rounds=3, sampler=sampler), work_dir=tmp_path, is_main=False, world_size=2
    )
    for r in (1, 2, 3):
        write_json_atomic(stage.kept_path(ctx, r), [{"prompt_id": 0, "round": r}])
    calls = []
    monkeypatch.setattr(stage, "_train_round", lambda c, kept, r: calls.append((f"round{r}", kept[0]["round"])))
    monkeypatch.setattr(stage, "_train", lambda c, kept: calls.append(("final", kept[0]["round"])))
    assert stage._follow(ctx) == {}
    assert [c[0] for c in calls] == trained
    assert [c[1] for c in calls] == [int(name[-1]) for name in trained[:-1]] + [3]  # the final one: the last pool
