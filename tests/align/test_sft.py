"""SFT: packed == unpacked loss, a tiny run that learns, kill-and-resume, and 2-process ZeRO-3."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.chat import tokenize_chat
from align.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

CHATS = [
    [
        {"role": "user", "content": "Name a colour.", "train": False},
        {"role": "assistant", "content": "Blue.", "train": True},
    ],
    [
        {"role": "user", "content": "Hi", "train": False},
        {"role": "assistant", "content": "Hello there, friend.", "train": True},
        {"role": "user", "content": "Bye", "train": False},
        {"role": "assistant", "content": "Goodbye!", "train": True},
    ],
    [
        {"role": "system", "content": "Answer in French.", "train": False},
        {"role": "user", "content": "Thanks", "train": False},
        {"role": "assistant", "content": "Merci a vous.", "train": True},
    ],
]


def test_packed_and_unpacked_loss_agree(tiny_dir, tiny_tok):
    """The packed, padding-free batch TRL builds gives the same token-mean loss as one chat at a time."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from align.models import load_causal_lm

    model = load_causal_lm(tiny_dir, "float32").eval()
    rows = []
    for chat in CHATS:
        t = tokenize_chat(tiny_tok, chat, 512)
        rows.append({"input_ids": t.input_ids, "labels": [i if m else -100 for i, m in zip(t.input_ids, t.loss_mask)]})
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            tgt = labels[0, 1:]
            keep = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
            count += int(keep.sum())
        unpacked = total / count
        collate = DataCollatorForLanguageModeling(pad_token_id=tiny_tok.pad_token_id, padding_free=True)
        batch = collate([{**r, "seq_lengths": [len(r["input_ids"])]} for r in rows])
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        # use_cache=False as in TRL's compute_loss: with a KV cache, transformers skips the packed-sequence
        # mask it derives from position_ids, and every chat would attend to the ones packed before it.
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        ).loss.item()
        # Without the position_ids (one long causal sequence) the answers would see earlier chats.
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert packed == pytest.approx(unpacked, abs=1e-5)
    assert abs(leaky - unpacked) > 1e-3


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_tiny_sft_run_learns_and_saves_a_loadable_checkpoint(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    from align.pipeline import run_pipeline

    cfg = load_config(TINY, ["stages=[sft]", f"run_dir={tmp_path}/run", "sft.train.max_steps=12", "sft.test_size=8"])
    (m,) = run_pipeline(cfg)
    s = m["summary"]
    assert m["status"] == "done" and s["train/steps"] == 12
    assert s["train/loss_last"] < s["train/loss_first"] - 0.5
    # the 8 held-out conversations' answer loss fell beyond its 95% interval
    assert s["heldout/n"] == 8 and s["data/conversations"] == 40
    assert s["heldout/loss_change_hi"] < 0 and not s["heldout/within_noise"]
    assert s["heldout/loss_after"] < s["heldout/loss_before"]
    out = Path(cfg.run_dir) / "sft" / "model"
    before, after = _weights(tiny_dir), _weights(out)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), f"unchanged: {set(before) - set(moved)}"
    AutoModelForCausalLM.from_pretrained(out)  # loads as a plain HF checkpoint
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all("train/loss" in r for r in rows)
    # A second run with the same config skips the stage; a changed config reruns it.
    (m2,) = run_pipeline(cfg)
    assert m2["finished_at"] == m["finished_at"]
    assert not (Path(cfg.run_dir) / ".work").exists() or not any((Path(cfg.run_dir) / ".work").iterdir())


def test_finite_step_guard_stops_or_skips_before_the_update():
    from align.errors import AlignError
    from align.sft import FiniteStepGuard

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    for mode in ("stop", "skip"):
        guard = FiniteStepGuard(opt, mode, step_of=lambda: 4)
        (w * float("nan")).sum().backward()
        if mode == "stop":
            with pytest.raises(AlignError, match="non-finite loss or gradient at step 5"):
                opt.step()
        else:
            opt.step()
            assert guard.skipped == 1 and w.grad is None and not opt.state  # no moment was created
        assert torch.equal(w.detach(), torch.ones(3))
        opt.zero_grad()
        opt.step = guard._step  # unwrap for the next mode
    (w * 2).sum().backward()
    FiniteStepGuard(opt, "skip", step_of=lambda: 0).optimizer.step()
    assert not torch.equal(w.detach(), torch.ones(3))  # a finite step goes through


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_loss_in_sft_stops_keeping_the_checkpoint_or_is_skipped(tmp_path, tiny_dir, monkeypatch, mode):
    from align.errors import AlignError
    from align.pipeline import run_pipeline
    from align.sft import sft_trainer_class

    SFTTrainer = sft_trainer_class()  # the trainer train_sft uses
    real = SFTTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.state.global_step == 2:  # the third optimizer step
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    cfg = load_config(
        TINY,
        [
            "stages=[sft]",
            f"run_dir={tmp_path}/run",
            "sft.train.max_steps=4",
            "sft.train.save_steps=2",
            f"sft.train.nonfinite={mode}",
        ],
    )
    if mode == "stop":
        with pytest.raises(AlignError, match="non-finite loss or gradient at step 3"):
            run_pipeline(cfg)
        ckpts = sorted(p.name for p in (Path(cfg.run_dir) / ".work" / "sft" / "checkpoints").glob("checkpoint-*"))
        assert ckpts == ["checkpoint-2"]  # the last good state; no half-trained model marked done
        assert not (Path(cfg.run_dir) / "sft").exists()
        monkeypatch.setattr(SFTTrainer, "compute_loss", real)  # the cause fixed: the rerun resumes at step 2
        (m,) = run_pipeline(cfg)
        assert m["status"] == "done" and m["summary"]["train/steps"] == 4
    else:
        (m,) = run_pipeline(cfg)
        assert m["status"] == "done" and m["summary"]["train/steps"] == 4
        rows = [json.loads(x) for x in (Path(cfg.run_dir) / "sft" / "metrics.jsonl").read_text().splitlines()]
        assert [r["train/skipped_steps"] for r in rows if "train/loss" in r] == [0, 0, 1, 1]
        weights = _weights(Path(cfg.run_dir) / "sft" / "model")
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_killed_sft_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["stage", "sft", str(TINY), f"run_dir={run_dir}", "sft.train.max_steps=40", "sft.train.save_steps=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ckpts = run_dir / ".work" / "sft" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any((p / "trainer_state.json").is_file() for p in ckpts.glob("checkpoint-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "sft").exists(), "a killed stage must not look finished"
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert done and done[-1] < 40
    res = _run(args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpts}/checkpoint-{done[-1]}" in res.stdout + res.stderr
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["summary"]["train/steps"] == 40
    # The resumed run trained only the steps left after the checkpoint.
    rows = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert max(steps) == 40 and set(steps) == set(range(1, 41))
    # Steps up to the checkpoint were logged once (by the killed run), not trained again.
    assert all(steps.count(k) == 1 for k in range(1, done[-1] + 1))


@pytest.mark.slow
def test_two_process_zero3_sft_trains(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    res = _run(
        [
            "stage",
            "sft",
            str(TINY),
            f"run_dir={run_dir}",
            "sft.train.num_processes=2",
            "sft.train.batch_size=8",
            "sft.train.micro_batch_size=4",
            "sft.train.max_steps=6",
        ],
        timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    s = manifest["summary"]
    assert s["train/steps"] == 6 and s["train/loss_last"] < s["train/loss_first"]
    before, after = _weights(tiny_dir), _weights(run_dir / "sft" / "model")
    assert all(before[k].shape == after[k].shape for k in before)  # gathered, not ZeRO-3 shards
    assert sum(not torch.equal(before[k], after[k]) for k in before) == len(before)


def test_a_full_disk_gives_one_clear_error_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A real ENOSPC from the kernel (a write to /dev/full) while the final model is written."""
    import align.sft as sft_mod
    from align.errors import AlignError
    from align.pipeline import run_pipeline

    real = sft_mod.save_policy

    def full_disk(*args, **kwargs):
        with open("/dev/full", "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()

    monkeypatch.setattr(sft_mod, "save_policy", full_disk)
    cfg = load_config(
        TINY, ["stages=[sft]", f"run_dir={tmp_path}/run", "sft.train.max_steps=2", "sft.train.save_steps=2"]
    )
    with pytest.raises(AlignError, match=r"disk full while stage 'sft' was writing .* rerun the same command"):
        run_pipeline(cfg)
    assert not (Path(cfg.run_dir) / "sft").exists()  # nothing marked done
    monkeypatch.setattr(sft_mod, "save_policy", real)
    (m,) = run_pipeline(cfg)  # resumes from checkpoint-2: no step is trained again
    assert m["status"] == "done" and m["summary"]["train/steps"] == 2


@pytest.mark.parametrize("packing", [True, False])
def test_trained_token_loss_matches_trls_fused_head(tmp_path, tiny_dir, tiny_tok, packing):
    """The CPU loss (only the trained positions projected, align.sft.sft_trainer_class) gives TRL's loss,
    gradients, entropy and token accuracy on the same batch: packed padding-free, or padded rows."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from align.models import load_causal_lm
    from align.sft import sft_trainer_class, tokenize_conversations

    dataset, _ = tokenize_conversations(tiny_tok, [{"messages": c} for c in CHATS], 512)
    args = TRLSFTConfig(
        output_dir=str(tmp_path),
        max_length=512,
        packing=packing,
        packing_strategy="bfd",
        per_device_train_batch_size=3,
        use_cpu=True,
        report_to=[],
        bf16=False,
    )
    results = {}
    for name, cls in (("trl", SFTTrainer), ("ours", sft_trainer_class())):
        torch.manual_seed(0)
        model = load_causal_lm(tiny_dir, "float32")
        trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tiny_tok)
        calls, forward = [], trainer.model.forward
        trainer.model.forward = lambda *a, _f=forward, _c=calls, **kw: (_c.append(kw), _f(*a, **kw))[1]
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert batch["input_ids"].shape[0] == (1 if packing else len(CHATS))  # packed padding-free, or padded rows
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[name] = (loss.item(), grads, metrics)
        # TRL scores every position through its fused head; ours projects the trained positions only
        kept = calls[0].get("logits_to_keep")
        if name == "trl":
            assert calls[0].get("fused_lm_head") is True and kept is None
        else:
            n_trained = int((batch["labels"][:, 1:] != -100).any(0).sum())  # positions trained in any row
            assert "fused_lm_head" not in calls[0] and kept.numel() == n_trained < batch["input_ids"].shape[1]
    (l_trl, g_trl, m_trl), (l_ours, g_ours, m_ours) = results["trl"], results["ours"]
    assert l_ours == pytest.approx(l_trl, rel=1e-5)
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 0
    for n in g_trl:
        torch.testing.assert_close(g_ours[n], g_trl[n], rtol=1e-4, atol=1e-6)
    for k in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert m_ours[k] == pytest.approx(m_trl[k], rel=1e-4), k


def test_trained_token_loss_is_cross_entropy_over_the_trained_tokens():
    from align.sft import trained_token_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    labels = torch.tensor([[3, -100, 7, 1, -100], [-100, -100, 2, 10, 0]])
    loss, entropy_sum, hits, n = trained_token_loss(logits, labels)
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits.float()[keep], labels[keep])
    assert int(n) == 6 and float(loss) == pytest.approx(float(ref), rel=1e-6)
    p = logits.float()[keep].softmax(-1)
    assert float(entropy_sum) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert int(hits) == int((logits.float()[keep].argmax(-1) == labels[keep]).sum())
    # under gradient accumulation the sum is divided by the step's trained tokens
    loss12, *_ = trained_token_loss(logits, labels, num_items=12)
    assert float(loss12) == pytest.approx(float(ref) / 2, rel=1e-6)


def test_heldout_split_and_answer_losses(tiny_dir, tiny_tok):
    from align.errors import AlignError
    from align.models import load_causal_lm
    from align.sft import answer_losses, split_heldout, tokenize_conversations

    records = [{"messages": c, "i": i} for i, c in enumerate(CHATS * 3)]
    train, test = split_heldout(records, 2, seed=0)
    assert len(test) == 2 and len(train) == len(records) - 2
    assert {r["i"] for r in train}.isdisjoint(r["i"] for r in test)
    assert split_heldout(records, 2, seed=0) == (train, test)
    with pytest.raises(AlignError, match="test_size"):
        split_heldout(records, len(records), seed=0)
    # the loss over answer tokens only equals the full-vocabulary cross entropy at the trained positions
    dataset, _ = tokenize_conversations(tiny_tok, test, 512)
    model = load_causal_lm(tiny_dir, "float32").eval()
    for row, loss in zip(dataset, answer_losses(tiny_dir, "float32", dataset)):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        keep = torch.tensor(row["assistant_masks"][1:], dtype=torch.bool)
        expected = torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep])
        assert loss == pytest.approx(float(expected), rel=1e-5)


def test_split_records_drops_duplicates_and_held_out_prompts_trained_on():
    from align.sft import split_heldout, split_records

    def chat(q, a):
        return {
            "messages": [
                {"role": "user", "content": q, "train": False},
                {"role": "assistant", "content": a, "train": True},
            ],
            "source": "s",
        }

    records = [chat(f"q{i}", f"a{i}") for i in range(20)]
    records += [chat("q3", "a3"), chat("q7", "a7")]  # exact duplicates: dropped, the first kept
    records += [chat(f"q{i}", f"another a{i}") for i in range(10)]  # same prompts, other answers
    train, test, stats = split_records(records, 8, seed=0)
    assert stats["data/duplicates_dropped"] == 2
    plain_train, plain_test = split_heldout(records[:20] + records[22:], 8, seed=0)  # the split itself is kept
    assert train == plain_train and test == [r for r in plain_test if r in test]
    prompts = {r["messages"][0]["content"] for r in train}
    assert stats["data/heldout_overlap_dropped"] == sum(r["messages"][0]["content"] in prompts for r in plain_test) > 0
    assert len(test) == 8 - stats["data/heldout_overlap_dropped"]
    assert not prompts & {r["messages"][0]["content"] for r in test}
    assert split_records(records, 8, seed=0) == (train, test, stats)
    # off: the plain split, nothing counted
    assert split_records(records, 8, seed=0, dedup=False) == (
        *split_heldout(records, 8, seed=0),
        {"data/duplicates_dropped": 0, "data/heldout_overlap_dropped": 0},
    )
