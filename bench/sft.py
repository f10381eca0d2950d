"""SFT step time: our trained-token loss vs TRL's fused LM head, same model, data and batches.

    .venv/bin/python bench/sft.py [--steps 5] [--samples 200] [--model embedded|tiny|DIR] [--out FILE]

SmolLM2-135M-Instruct in the run's precision (--precision; auto: bf16 with bf16 units, else fp32) with LoRA r16 (the GAtt and rejection-sampling setting), TRL's
padding-free `bfd` packing, 4 x 512 tokens a micro-batch, on GAtt training samples made by program from
Alpaca/OASST answers (`align.gatt.build.reference_records`: only the last answer of each is trained).
Both trainers are TRL's `SFTTrainer`; ours (`align.sft.sft_trainer_class`) replaces only the loss: on
the CPU TRL's fused head scores every position in fp32 tiles, ours projects the trained positions in the
autocast dtype. Times forward + backward of the same micro-batches, alternating the two twice; prints
the median seconds a step of each, their ratio and both losses; writes bench/out/sft.json (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny' or a local HF model directory"
    )
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="both sides' precision")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "sft.json"), help="JSON output")
    args = ap.parse_args()

    from transformers import AutoConfig
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from align.attention import use_varlen
    from align.config import load_config
    from align.gatt.build import reference_records
    from align.gatt.instructions import InstructionBank
    from align.gatt.stage import load_user_sequences
    from align.models import model_dir_from_arg, load_causal_lm, load_tokenizer, peft_lora_config
    from align.precision import hardware, hardware_line, resolve_precision
    from align.sft import sft_trainer_class, tokenize_conversations

    precision = resolve_precision(args.precision)
    print(hardware_line(precision), flush=True)

    cfg = load_config(ROOT / "configs" / "default.yaml", [f"data_dir={ROOT.parent / 'shared' / 'data'}"])
    loaded, _ = load_user_sequences(SimpleNamespace(stage_cfg=cfg.gatt, cfg=cfg))
    bank, rng = InstructionBank.load(), random.Random(0)
    kinds = bank.checkable_names((), "bench")
    # answers of up to 600 characters: the workload of bench/README.md's figure
    records, _ = reference_records(
        [p for _, p in loaded if p], args.samples, 3, lambda: bank.sample(rng, 0.5, only=kinds), "last", rng, 600
    )
    model_dir = model_dir_from_arg(args.model)
    tok = load_tokenizer(model_dir)
    dataset, stats = tokenize_conversations(tok, records, 512)
    targs = TRLSFTConfig(
        output_dir=str(Path(args.out).parent / "sft_ckpt"),
        max_length=512,
        packing=True,
        packing_strategy="bfd",
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        bf16=precision.bf16,
        gradient_checkpointing=False,
    )
    # the default's GAtt LoRA; a smaller model (the smoke test's) gets adapters on every layer it has
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    lora = cfg.gatt.train.lora
    lora = dataclasses.replace(lora, top_layers=min(lora.top_layers, layers))
    times: dict[str, list[float]] = {"trl": [], "ours": []}
    losses: dict[str, float] = {}
    for name, cls in (("trl", SFTTrainer), ("ours", sft_trainer_class())) * 2:
        model = load_causal_lm(model_dir, precision.dtype)
        use_varlen(model)
        trainer = cls(
            model=model,
            args=targs,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_lora_config(lora, model.config.num_hidden_layers),
        )
        batches = iter(trainer.get_train_dataloader())
        trainer.model.train()
        for _ in range(args.steps):
            batch = trainer._prepare_inputs(next(batches))
            start = time.perf_counter()
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            times[name].append(time.perf_counter() - start)
            trainer.model.zero_grad(set_to_none=True)
        losses[name] = float(loss)
        print(
            f"{name}: {statistics.median(times[name][-args.steps :]):.2f} s a step (median of {args.steps})", flush=True
        )
    trl_s, ours_s = statistics.median(times["trl"]), statistics.median(times["ours"])
    out = {
        "hardware": hardware(),
        "precision": precision.as_dict(),
        "trl_s_per_step": trl_s,
        "ours_s_per_step": ours_s,
        "speedup": trl_s / ours_s,
        "loss_last_batch": losses,
        "tokens_per_step": 4 * 512,
        "answer_token_share": stats["data/answer_tokens"] / stats["data/tokens"],
    }
    print(
        f"TRL fused head {trl_s:.2f} s a step, ours {ours_s:.2f} s: {trl_s / ours_s:.2f}x "
        f"(last-batch loss TRL {losses['trl']:.4f}, ours {losses['ours']:.4f}; "
        f"{100 * out['answer_token_share']:.0f}% of tokens trained)"
    )
    out_file = Path(args.out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
