"""Make a labeling batch: two responses per prompt from the current policy, with two sampling
settings (and optionally two checkpoints), stored as round N (Llama 2 sec. 3.2.1: "two responses
to one prompt, sampled from two different model variants and/or temperatures").

Written against the engine interface (`rollout.make_engine`): each side loads its engine, samples
one response per prompt, and is closed before the other side loads, so two checkpoints never sit
in memory together. Which side is shown as A is drawn per pair (seeded), so a labeler cannot learn
"A is the cold one"; the settings of each shown side are stored with the pair.

`generate_configured_round` is the one place that turns a `LabelConfig` into a round (prompts,
policies, gold pairs); `align label generate` and the pipeline's label stage both call it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

from align.config import SamplingConfig
from align.errors import AlignError
from rollout.types import derive_seed


def select_prompts(prompts: Sequence[dict], per_round: int, seed: int, round_number: int) -> list[dict]:
    """``per_round`` prompts drawn by (seed, round) in file order; all when per_round is 0 or >= len."""
    if per_round == 0 or per_round >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(derive_seed(seed, round_number)).sample(range(len(prompts)), per_round))
    return [prompts[i] for i in keep]


def gold_pairs(records: Sequence[dict], per_labeler: int, seed: int, round_number: int) -> list[dict]:
    """Gold pairs for `LabelStore.create_round` from preference records (the chosen response is the
    known answer): ``per_labeler`` of them drawn by (seed, round) (0 = all), each shown with its
    chosen response as A or B by a seeded draw, so the answer is not always on one side."""
    picked = select_prompts(records, per_labeler, seed, round_number)
    rng = random.Random(derive_seed(seed, 1_000_003 * round_number))
    out = []
    for r in picked:
        answer = "a" if rng.random() < 0.5 else "b"
        first, second = (r["chosen"], r["rejected"]) if answer == "a" else (r["rejected"], r["chosen"])
        out.append(
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
                "response_a": first,
                "response_b": second,
                "category": r.get("category") or "helpfulness",
                "source": r.get("source") or "gold",
                "answer": answer,
            }
        )
    return out


def sample_side(engine, prompts: Sequence[dict], sampling: SamplingConfig, seed: int) -> list[dict]:
    """One response per prompt record from ``engine``: ``[{"text", "finish_reason", "tokens"}]``."""
    from rollout import SamplingParams

    params = SamplingParams(
        n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, seed=seed
    )
    out = engine.generate([p["prompt"] for p in prompts], params)
    return [
        {"text": out.texts[r], "finish_reason": out.finish_reasons[r], "tokens": len(out.response_ids[r])}
        for r in range(len(out))
    ]


def build_pairs(
    prompts: Sequence[dict],
    side_a: Sequence[dict],
    side_b: Sequence[dict],
    settings_a: dict,
    settings_b: dict,
    seed: int,
) -> tuple[list[dict], dict]:
    """Pairs for `LabelStore.create_round` and counts of what was left out.

    A pair is left out when a response is empty (after stripping) or both are the same text: no
    labeler can prefer one, and the exported record would be invalid. The shown order is drawn per
    prompt from ``seed``.
    """
    rng = random.Random(seed)
    pairs, empty, identical = [], 0, 0
    for i, (prompt, a, b) in enumerate(zip(prompts, side_a, side_b, strict=True)):
        swap = rng.random() < 0.5
        if not a["text"].strip() or not b["text"].strip():
            empty += 1
            continue
        if a["text"] == b["text"]:
            identical += 1
            continue
        sides = [(a, settings_a), (b, settings_b)]
        if swap:
            sides.reverse()
        (ra, sa), (rb, sb) = sides
        pairs.append(
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt["prompt"]],
                "response_a": ra["text"],
                "response_b": rb["text"],
                # prompt_index: the prompt's row in the generation call, which (with the seed) fixes the sample.
                "settings_a": {**sa, "prompt_index": i, "finish_reason": ra["finish_reason"], "tokens": ra["tokens"]},
                "settings_b": {**sb, "prompt_index": i, "finish_reason": rb["finish_reason"], "tokens": rb["tokens"]},
                "category": "safety" if prompt.get("safety") else "helpfulness",
                "source": prompt.get("source") or "",
            }
        )
    return pairs, {"label/dropped_empty": empty, "label/dropped_identical": identical}


def generate_round(
    store,
    prompts: Sequence[dict],
    rollout_cfg,
    sampling_a: SamplingConfig,
    sampling_b: SamplingConfig,
    model_dir_a: str | Path,
    model_dir_b: Optional[str | Path] = None,
    *,
    dtype: str,
    seed: int = 0,
    round_number: Optional[int] = None,
    labels_per_pair: int = 1,
    assign_to: Optional[Sequence[str]] = None,
    names: tuple[str, str] = ("", ""),
    gold: Sequence[dict] = (),
) -> dict:
    """Sample both sides for ``prompts`` (records of kind prompt) and store them as one round.

    Args:
        store: a `LabelStore`.
        prompts: ``[{"prompt": [messages ending with a user turn], "safety": bool, "source": str}]``;
            a safety-tagged prompt makes a ``safety`` pair, any other a ``helpfulness`` pair.
        rollout_cfg: an `align.config.RolloutConfig` (which engine, max_model_len, threads).
        dtype: the engine's weights dtype (the run's precision: `PipelineConfig.compute.dtype`).
        sampling_a, sampling_b: the two sampling settings.
        model_dir_a: the HF directory of the policy that samples side A.
        model_dir_b: the one of side B (None = the same as A; one engine serves both sides).
        seed: the seed of the round; the samples depend on (seed, round, side).
        round_number: the round to create (None = one after the highest).
        labels_per_pair, assign_to: see `LabelStore.create_round`.
        names: how the settings name the two policies (e.g. the stage names; '' = the directory).
        gold: gold pairs (`gold_pairs`) mixed into the round.

    Returns:
        ``{"round", "label/prompts", "label/pairs", "label/dropped_empty", "label/dropped_identical",
        "label/generated_tokens", "label/gold_pairs"}``.
    """
    from rollout import make_engine

    if not prompts:
        raise AlignError("label generate: no prompts; list prompt datasets in label.prompts")
    number = round_number if round_number is not None else max((r["round"] for r in store.rounds()), default=0) + 1
    dirs = [Path(model_dir_a), Path(model_dir_b) if model_dir_b is not None else Path(model_dir_a)]
    sides, settings, tokens = [], [], 0
    engine = None
    try:
        for k, (sampling, model_dir) in enumerate(zip((sampling_a, sampling_b), dirs)):
            if engine is None or dirs[k] != dirs[k - 1]:
                if engine is not None:
                    engine.close()
                engine = make_engine(rollout_cfg, model_dir, seed=seed, dtype=dtype)
            side_seed = derive_seed(seed, 2 * number + k)
            out = sample_side(engine, prompts, sampling, side_seed)
            sides.append(out)
            tokens += sum(o["tokens"] for o in out)
            settings.append(
                {
                    "side": "AB"[k],
                    "policy": names[k] or str(model_dir),
                    "engine": rollout_cfg.engine,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_new_tokens": sampling.max_new_tokens,
                    "seed": side_seed,
                }
            )
    finally:
        if engine is not None:
            engine.close()
    pairs, dropped = build_pairs(prompts, sides[0], sides[1], settings[0], settings[1], derive_seed(seed, number))
    if not pairs:
        raise AlignError(
            f"label generate: all {len(prompts)} prompts gave an empty or identical pair of responses; "
            "raise max_new_tokens or make the two sampling settings differ more"
        )
    counts = {
        "label/prompts": len(prompts),
        "label/pairs": len(pairs),
        **dropped,
        "label/generated_tokens": tokens,
        "label/gold_pairs": len(gold),
    }
    # The counts travel with the round: a stage that finishes on a later run (judge: people) reports them.
    round_settings = {
        "seed": seed,
        "sampling_a": settings[0],
        "sampling_b": settings[1],
        "prompts": len(prompts),
        "counts": counts,
    }
    store.create_round(
        pairs, number=number, labels_per_pair=labels_per_pair, assign_to=assign_to, settings=round_settings, gold=gold
    )
    return {"round": number, **counts}


def resolve_model(cfg, name: str, run_dir: Path, key: str, stage_dirs: Optional[dict] = None) -> Path:
    """The model directory ``name`` stands for: 'base' (the config's model), an earlier stage's
    ``model/`` in ``run_dir`` (its latest round's, from ``stage_dirs``), or a local directory."""
    from align.models import check_model_dir, resolve_model_dir
    from align.stages import STAGES

    if name == "base":
        return resolve_model_dir(cfg.model)
    stage = (stage_dirs or {}).get(name, run_dir / name)
    if (stage / "manifest.json").is_file() and (stage / "model").is_dir():
        return stage / "model"
    if name in STAGES:
        raise AlignError(
            f"{key}={name!r}: stage '{name}' has not finished in {run_dir}; run it first (`align stage {name} CONFIG`)"
        )
    path = Path(name).expanduser()
    check_model_dir(path, key)
    return path


def generate_configured_round(
    store,
    cfg,
    label_cfg,
    round_number: int,
    run_dir: Path,
    *,
    assign_to: Optional[Sequence[str]] = None,
    stage_dirs: Optional[dict] = None,
) -> dict:
    """Round ``round_number`` as ``label_cfg`` (a `LabelConfig` of the `PipelineConfig` ``cfg``) says:
    its prompts drawn by (seed, round), both policies resolved in ``run_dir`` (or ``stage_dirs``), its
    gold pairs; returns `generate_round`'s counts."""
    from align.data.load import load_datasets

    data_dir = Path(cfg.data_dir)
    ds, _ = load_datasets(label_cfg.prompts, "prompt", data_dir, cfg.data.bad_rows, cfg.seed)
    prompts = select_prompts(ds.to_list(), label_cfg.prompts_per_round, cfg.seed, round_number)
    gold = []
    if label_cfg.gold:
        records, _ = load_datasets(label_cfg.gold, "preference", data_dir, cfg.data.bad_rows, cfg.seed)
        gold = gold_pairs(records.to_list(), label_cfg.gold_per_labeler, cfg.seed, round_number)
    dir_a = resolve_model(cfg, label_cfg.init, run_dir, "label.init", stage_dirs)
    dir_b = resolve_model(cfg, label_cfg.init_b, run_dir, "label.init_b", stage_dirs) if label_cfg.init_b else None
    return generate_round(
        store,
        prompts,
        cfg.rollout,
        label_cfg.sampling_a,
        label_cfg.sampling_b,
        dir_a,
        dir_b,
        dtype=cfg.compute.dtype,
        seed=cfg.seed,
        round_number=round_number,
        labels_per_pair=label_cfg.labels_per_pair,
        assign_to=assign_to,
        names=(label_cfg.init, label_cfg.init_b or label_cfg.init),
        gold=gold,
    )
