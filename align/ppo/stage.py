"""PPO stage, Llama 2 (Touvron et al., 2023) sec. 3.2.3: setup -> train -> save.

One iteration:
  1. generate  the rollout engine (vLLM; its weights are the current policy's) samples one response to
               each of `prompts_per_iteration` prompts (rank 0; the rows are broadcast);
  2. score     both reward models score every response (rows sharded over ranks), and
               reward.combined.combined_reward gives R~c = WHITEN(LOGIT(Rc)), with the running moments
               kept across iterations (and checkpointed);
  3. logprob   the training model recomputes log pi_old (the engine's log-probs are only compared:
               `rollout/logprob_gap`), log pi_0 (the same model, adapters off) and the values; per-token
               rewards R~c - beta * KL, GAE, whitened advantages (align/ppo/train.make_trajectory);
  4. train     `ppo_epochs` passes in mini-batches, one AdamW step each (align/ppo/train.ppo_update);
  5. sync      the new weights are pushed into the engine (rollout `update_weights`);
  6. eval      every `eval_every` iterations: the mean LOGIT(Rc) on held-out prompts (sampled at the
               training temperature with a fixed seed, so only the policy changes between evaluations);
               `early_stop_patience` evaluations without a gain stop the run.

Metrics, one row per iteration (step = iteration; step 0 holds the held-out reward before training):
`ppo/*`, `reward/*`, `kl/*`, `rollout/*`, `time/*`, `eval/reward_heldout`. `reward/combined_mean` is the
batch mean of LOGIT(Rc) BEFORE whitening (the whitened reward has mean ~0 by construction).

Processes: with `num_processes > 1` the stage runs on every rank under `accelerate launch`, the policy
sharded by DeepSpeed ZeRO-3 (gloo on CPU). The engine lives on rank 0 only and must then run in its own
process (`rollout.in_process: false`): an in-process vLLM engine joins the ranks' torch.distributed
world and hangs there.

Checkpoints: every `save_every` iterations `work_dir/checkpoints/iter-N/` (adapters + value head,
optimizer, running moments, RNG, iteration, early-stopping state), written atomically by
align/checkpoint.py; a restart resumes from the newest complete one. Artifacts: `model/` (the adapters merged into the starting
checkpoint, float32, with the tokenizer), `adapter/`, `value_head.safetensors`, `ppo_curve.png`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from align import checkpoint
from align.errors import AlignError
from align.faults import fault
from align.io import read_json, read_metrics
from align.launch import dist

if TYPE_CHECKING:
    from align.config import PPOConfig
    from align.pipeline import StageContext

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
CHECKPOINT_PREFIX = "iter"
PHASES = ("generate", "score", "logprob", "train", "sync", "eval")


# ---------------------------------------------------------------------------------------------------
# Prompts


def split_prompts(rows: list[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out prompts): a seeded random `heldout` of the rows are held out."""
    if len(rows) <= heldout:
        raise AlignError(
            f"ppo: {len(rows)} prompts, but heldout_prompts={heldout} of them are held out; "
            "add prompts or lower heldout_prompts"
        )
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:heldout])
    pool = sorted(perm[heldout:])
    return [rows[i] for i in pool], [rows[i] for i in held]


def split_unique_prompts(
    rows: list[dict], heldout: int, seed: int, dedup: bool = True
) -> tuple[list[dict], list[dict], dict]:
    """(pool, held-out, counts): `split_prompts`; with ``dedup``, of the rows without exact duplicates (the
    first kept), and then without the held-out prompts the pool also has."""
    from align.data.dedup import drop_duplicates, drop_overlap

    dups = overlap = 0
    if dedup:
        rows, dups = drop_duplicates(rows)
    pool, held = split_prompts(rows, heldout, seed)
    if dedup:
        held, overlap = drop_overlap(held, pool)
    return pool, held, {"data/duplicates_dropped": dups, "data/heldout_overlap_dropped": overlap}


def iteration_prompts(n_pool: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Pool indices of iteration `iteration` (1-based): consecutive slices of a stream of seeded
    permutations of the pool (one per pass), so every prompt is used once per pass and a resumed run
    draws what the uninterrupted one would have."""
    out, pos = [], (iteration - 1) * per_iteration
    while len(out) < per_iteration:
        epoch, offset = divmod(pos, n_pool)
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = min(per_iteration - len(out), n_pool - offset)
        out.extend(perm[offset : offset + take])
        pos += take
    return out


def sampling_seed(seed: int, iteration: int) -> int:
    """The engine seed of an iteration's samples (iteration 0 = the held-out evaluations)."""
    return (seed * 1_000_003 + iteration * 7_919 + 1) % (1 << 62)


def plain(messages: Sequence[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------------------------------
# Reward models


class RewardModels:
    """The helpfulness and safety RMs of the stages named in `RewardUseConfig`, each loaded with the
    settings it trained with (its model/scorer.json); the rows to score are split over the ranks.

    ``zero3`` (``reward.shard``): each RM's weights partitioned over the ranks too; every rank then
    takes part in every forward, including ranks with no rows (`RewardScorer.score_ids`)."""

    def __init__(self, ctx, reward_cfg, zero3: dict | None = None):
        from align.rejection.score import load_reward_scorers

        self.helpful, self.safety = load_reward_scorers(ctx, reward_cfg, zero3)
        self.batch_size = reward_cfg.score_batch_size
        self.rank, self.world = ctx.rank, ctx.world_size
        self.sharded = zero3 is not None

    def score(self, prompts: Sequence[Sequence[dict]], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (safety, helpfulness) scores, (B,) each, on every rank; rank r scores rows r, r + W, ..."""
        mine = list(range(self.rank, len(texts), self.world))
        p = [plain(prompts[i]) for i in mine]
        t = [texts[i] for i in mine]
        scoring = bool(mine) or self.sharded
        rs = self.safety.score(p, t, self.batch_size) if scoring else torch.zeros(0)
        rh = self.helpful.score(p, t, self.batch_size) if scoring else torch.zeros(0)
        rs_all, rh_all = torch.zeros(len(texts)), torch.zeros(len(texts))
        for idx, a, b in dist.all_gather_object((mine, rs.tolist(), rh.tolist())):
            rs_all[idx], rh_all[idx] = torch.tensor(a), torch.tensor(b)
        return rs_all, rh_all


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(root: Path, learner, state: dict, rank: int) -> Path:
    """Checkpoint `root/iter-N` (align/checkpoint.py); every rank calls it and writes its part."""
    return checkpoint.save_checkpoint(
        root,
        f"{CHECKPOINT_PREFIX}-{state['iteration']}",
        state,
        learner.save,
        rank=rank,
        keep=KEEP_CHECKPOINTS,
        fault_point="ppo_checkpoint",  # everything written, nothing renamed yet
    )


def load_checkpoint(path: Path, learner, rank: int) -> dict:
    """Restore the adapters, value head, optimizer and this rank's RNG; returns the loop state."""
    learner.load(path)
    return checkpoint.load_checkpoint(path, rank)


# ---------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Run:
    """What the loop needs, built by `setup`."""

    learner: object
    scheduler: object  # the lr schedule (align/ppo/policy.py `lr_scheduler`), stepped by ppo_update
    engine: Optional[object]  # this rank's rollout engine (rank 0's, or one of `rollout.replicas`), else None
    rewards: RewardModels
    tokenizer: object
    pool: list[dict]
    heldout: list[dict]
    moments: object  # reward.combined.RunningMoments
    state: dict  # iteration, eval history, early stopping; checkpointed
    logger: Optional[object]
    autocast: bool
    hf_ds_config: Optional[object] = None  # keeps ZeRO-3 model loading on while alive
    closers: list = field(default_factory=list)
    data_stats: dict = field(default_factory=dict)  # the prompt split's counts, for the summary
    replicas: int = 1  # engines generating in parallel (`rollout.replicas`), on ranks 0, W/R, 2W/R, ...
    replica: int = 0  # this rank's replica index (its engine's, or the one before it)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()


def setup(ctx: StageContext) -> Run:
    from align.data.load import load_datasets
    from align.models import compile_layers, load_tokenizer
    from align.launch.zero3 import DeepSpeedLearner
    from align.ppo.policy import build_policy, deepspeed_config, lr_scheduler, make_optimizer, torch_learner
    from reward.combined import RunningMoments
    from rollout import make_engine

    cfg: PPOConfig = ctx.stage_cfg
    multi = ctx.world_size > 1
    if multi:
        from align.launch import start_sampling_ranks

        start_sampling_ranks("ppo.num_processes", cfg.num_processes, ctx.cfg.rollout)
    tokenizer = load_tokenizer(ctx.init_model_dir)
    records, _ = load_datasets(cfg.prompts, "prompt", Path(ctx.cfg.data_dir), ctx.cfg.data.bad_rows, ctx.cfg.seed)
    pool, heldout, data_stats = split_unique_prompts(
        records.to_list(), cfg.heldout_prompts, ctx.cfg.seed, ctx.cfg.data.dedup
    )
    if ctx.is_main:
        print(
            f"[align] {ctx.name}: {len(pool)} training prompts, {len(heldout)} held out; init {ctx.init_model_dir}",
            flush=True,
        )
    replicas, every, slot = engine_replicas(ctx.cfg.rollout, ctx.world_size, ctx.rank)
    # Plain (unsharded) loads first: once an HfDeepSpeedConfig exists, from_pretrained partitions.
    launch_ds = read_json(ctx.work_dir / "launch" / "ds_zero3.json") if multi else None  # the launch's ZeRO-3 JSON
    rm_zero3 = None
    if cfg.reward.shard:  # partitioned as they load, under a ZeRO-3 config of their own (inference: no optimizer)
        from align.launch.zero3 import resolve_config

        rm_zero3 = resolve_config(launch_ds, 1, 1, ctx.world_size, 0.0, ctx.cfg.compute.bf16)
    rewards = RewardModels(ctx, cfg.reward, rm_zero3)
    threads = torch.get_num_threads()
    engine = (
        make_engine(ctx.cfg.rollout, ctx.init_model_dir, seed=ctx.cfg.seed, dtype=ctx.cfg.compute.dtype, slot=slot)
        if ctx.rank % every == 0
        else None
    )
    torch.set_num_threads(threads)  # an in-process engine pins its own thread count
    if engine is not None and replicas > 1:
        print(f"[align] {ctx.name}: engine replica {ctx.rank // every} of {replicas} on rank {ctx.rank}", flush=True)
    lora_dtype = ctx.cfg.compute.dtype  # frozen base weights; adapters and value head are float32
    hf_ds = None
    if multi:
        from transformers.integrations import HfDeepSpeedConfig

        ds = deepspeed_config(launch_ds, cfg, ctx.world_size, ctx.cfg.compute.bf16)
        hf_ds = HfDeepSpeedConfig(ds)
        net = build_policy(ctx.init_model_dir, cfg.lora, lora_dtype, ctx.cfg.seed, cfg.gradient_checkpointing)
        optimizer = make_optimizer(net, cfg)
        learner = DeepSpeedLearner(net, optimizer, ds)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        learner = torch_learner(
            build_policy(ctx.init_model_dir, cfg.lora, lora_dtype, ctx.cfg.seed, cfg.gradient_checkpointing),
            cfg,
            device,
        )
        optimizer = learner.optimizer
        for model in (learner.net, rewards.helpful.model, rewards.safety.model):  # the first iteration pays it
            compile_layers(model, cfg.compile)  # one process (config check)
    moments = RunningMoments()
    state = {
        "iteration": 0,
        "heldout_before": None,
        "best_heldout": None,
        "best_iteration": 0,
        "bad_evals": 0,
        "stopped_early": False,
    }
    latest = checkpoint.latest_checkpoint(ctx.work_dir / CHECKPOINTS, CHECKPOINT_PREFIX)
    if latest:
        state = load_checkpoint(latest, learner, ctx.rank)
        moments.load_state_dict(state.pop("moments"))
        if ctx.is_main:
            print(f"[align] {ctx.name}: resuming from {latest} (iteration {state['iteration']})", flush=True)
    scheduler = lr_scheduler(optimizer, cfg, state["iteration"])  # its position follows from the iteration
    logger = None
    if ctx.is_main:
        # rows logged after the checkpoint are logged again; without a checkpoint, every row is
        _truncate_metrics(ctx.work_dir / "logs" / "metrics.jsonl", state["iteration"] if latest else -1)
        logger = ctx.logger()
    run = Run(
        learner=learner,
        scheduler=scheduler,
        engine=engine,
        rewards=rewards,
        tokenizer=tokenizer,
        pool=pool,
        heldout=heldout,
        moments=moments,
        state=state,
        logger=logger,
        autocast=ctx.cfg.compute.bf16,
        hf_ds_config=hf_ds,
        data_stats=data_stats,
        replicas=replicas,
        replica=ctx.rank // every,
    )
    if engine is not None:
        run.closers.append(engine.close)
    if logger is not None:
        run.closers.append(logger.close)
    if state["iteration"] > 0:
        sync_weights(run)  # the engine starts from the initial checkpoint, the policy from the resumed one
    return run


def engine_replicas(rollout, world: int, rank: int) -> tuple[int, int, tuple[int, int]]:
    """(replicas, every, slot): an engine on every `every`-th rank (world / replicas, checked by
    `align.config.replica_spacing`), and this rank's engine's slot (i, k) among the k on its machine
    (`rollout.make_engine`). Checked on every rank, before anything loads, so no rank waits on one that
    refused; the machine's ranks are known only here."""
    from align.config import replica_spacing

    replicas, every = rollout.replicas, replica_spacing(rollout, world)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if replicas > 1 and local_world % every and every % local_world:
        raise AlignError(
            f"rollout.replicas={replicas}: an engine every {every} ranks does not tile machines of "
            f"{local_world} ranks; choose replicas so that num_processes / replicas divides the ranks a "
            "machine or is a multiple of them"
        )
    return replicas, every, (local_rank // every, max(1, local_world // every))


def replica_slice(n: int, replica: int, replicas: int) -> slice:
    """Replica `replica`'s share of `n` prompts: consecutive, the first n % replicas shares one longer."""
    base, extra = divmod(n, replicas)
    start = replica * base + min(replica, extra)
    return slice(start, start + base + (replica < extra))


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop the rows logged after step `iteration` (-1: all of them)."""
    import json

    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= iteration]
    if len(keep) != len(rows):
        from align.io import write_text_atomic

        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------------------
# Phases


def sync_weights(run: Run) -> float:
    """Push the policy into the engine; every rank takes part in the ZeRO-3 gathers."""
    start = time.perf_counter()
    from rollout import push_weights

    push_weights(run.engine, run.learner.net.policy)  # ranks without the engine only take part in the gathers
    dist.barrier()
    return time.perf_counter() - start


def generate(run: Run, prompts: list[dict], cfg, seed: int, n: int = 1):
    """One response per prompt; every rank gets the `Rollouts`. One engine (rank 0's) samples them all;
    with replicas, each samples its consecutive share, seeded by the prompts' places in the whole list,
    so the rows are those one engine would sample."""
    from rollout import Rollouts, SamplingParams

    rollouts = None
    if run.engine is not None:
        threads = torch.get_num_threads()
        share = replica_slice(len(prompts), run.replica, run.replicas)
        params = SamplingParams(
            n=n,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            max_new_tokens=cfg.sampling.max_new_tokens,
            seed=seed,
            first_prompt=share.start,
        )
        if share.stop > share.start:
            rollouts = run.engine.generate([plain(p["prompt"]) for p in prompts[share]], params)
        torch.set_num_threads(threads)
    if run.replicas == 1:
        return dist.broadcast_object(rollouts)
    return Rollouts.concat([r for r in dist.all_gather_object(rollouts) if r is not None])  # in replica order


def evaluate(run: Run, cfg, seed: int) -> list[float]:
    """Per held-out prompt, LOGIT(Rc) (the combined reward before whitening: comparable across
    iterations) averaged over its `eval_samples` samples, drawn with a fixed seed; the stage reports
    their mean and the interval of its change over prompts."""
    from reward.combined import combined_reward

    k = cfg.eval_samples
    rollouts = generate(run, run.heldout, cfg, sampling_seed(seed, 0), n=k)
    rows = [p for p in run.heldout for _ in range(k)]  # rows grouped by prompt (rollout.Rollouts)
    rs, rh = run.rewards.score([p["prompt"] for p in rows], rollouts.texts)
    flags = torch.tensor([bool(p["safety"]) for p in rows])
    score, _ = combined_reward(rs, rh, flags, None, cfg.reward.safety_threshold, whiten=False)
    return score.view(len(run.heldout), k).mean(dim=1).tolist()


def record_eval(state: dict, value: float, iteration: int, patience: int) -> bool:
    """Update the early-stopping state with a held-out reward; True (and ``state["stopped_early"]``) once
    `patience` evaluations in a row have not beaten the best so far (patience 0: never)."""
    if state["best_heldout"] is None or value > state["best_heldout"]:
        state.update(best_heldout=value, best_iteration=iteration, bad_evals=0)
    else:
        state["bad_evals"] += 1
        if patience and state["bad_evals"] >= patience:
            state["stopped_early"] = True
    return state["stopped_early"]


# ---------------------------------------------------------------------------------------------------
# Train


def train(ctx: StageContext, run: Run) -> None:
    from tqdm.auto import tqdm

    from align.ppo.train import build_batch, make_trajectory, ppo_update
    from reward.combined import combined_reward

    cfg, seed, state = ctx.stage_cfg, ctx.cfg.seed, run.state
    pad_id = run.tokenizer.pad_token_id
    if run.heldout and state["heldout_before"] is None:
        t0 = time.perf_counter()
        scores = evaluate(run, cfg, seed)
        before = sum(scores) / len(scores)
        state.update(
            heldout_before=before,
            best_heldout=before,
            best_iteration=0,
            heldout_before_scores=scores,
            heldout_last_scores=scores,
        )
        if run.logger:
            run.logger.log({"eval/reward_heldout": before, "time/eval_s": time.perf_counter() - t0}, 0)
    bar = tqdm(
        total=cfg.iterations,
        initial=state["iteration"],
        desc="ppo",
        unit="it",
        dynamic_ncols=True,
        disable=not ctx.is_main,
    )
    while state["iteration"] < cfg.iterations and not state["stopped_early"]:
        it = state["iteration"] + 1
        timing: dict[str, float] = {}
        # ---- generate
        t0 = time.perf_counter()
        prompts = [run.pool[i] for i in iteration_prompts(len(run.pool), cfg.prompts_per_iteration, seed, it)]
        rollouts = generate(run, prompts, cfg, sampling_seed(seed, it))
        timing["generate"] = time.perf_counter() - t0
        # ---- score
        t0 = time.perf_counter()
        rs, rh = run.rewards.score([p["prompt"] for p in prompts], rollouts.texts)
        flags = torch.tensor([bool(p["safety"]) for p in prompts])
        scores, reward_metrics = combined_reward(
            rs, rh, flags, run.moments, cfg.reward.safety_threshold, whiten=cfg.reward.whiten
        )
        if not torch.isfinite(scores).all():
            raise AlignError(
                f"iteration {it}: non-finite reward (raw helpfulness {rh.tolist()[:4]}, safety "
                f"{rs.tolist()[:4]}, ...); check the reward models"
            )
        timing["score"] = time.perf_counter() - t0
        # ---- logprob: old and reference log-probs, values, rewards, advantages
        t0 = time.perf_counter()
        input_ids, attention_mask, response_mask = build_batch(rollouts.prompt_ids, rollouts.response_ids, pad_id)
        _, engine_logprobs, _ = rollouts.response_tensors(pad_id)
        traj, traj_metrics = make_trajectory(
            run.learner, input_ids, attention_mask, response_mask, engine_logprobs, scores, cfg, run.autocast
        )
        timing["logprob"] = time.perf_counter() - t0
        # ---- train
        t0 = time.perf_counter()
        update_metrics, _ = ppo_update(
            run.learner,
            traj,
            cfg,
            seed=sampling_seed(seed, it),
            autocast=run.autocast,
            iteration=it,
            scheduler=run.scheduler,
        )
        timing["train"] = time.perf_counter() - t0
        # ---- sync
        timing["sync"] = sync_weights(run)
        # ---- eval and early stopping
        row = {}
        if run.heldout and (it % cfg.eval_every == 0 or it == cfg.iterations):
            t0 = time.perf_counter()
            held = evaluate(run, cfg, seed)  # not `scores`: that name holds this iteration's rewards
            value = sum(held) / len(held)
            state["heldout_last_scores"] = held
            timing["eval"] = time.perf_counter() - t0
            row["eval/reward_heldout"] = value
            record_eval(state, value, it, cfg.early_stop_patience)
        state["iteration"] = it
        lengths = response_mask.sum(-1).float()
        row.update(
            {
                **update_metrics,
                **traj_metrics,
                **{k: v for k, v in reward_metrics.items() if k != "reward/mean"},
                "reward/whitened_mean": scores.mean().item(),
                "reward/combined_mean": reward_metrics["reward/logit_mean"],
                "reward/helpful_mean": rh.mean().item(),
                "reward/safety_mean": rs.mean().item(),
                "rollout/response_length": lengths.mean().item(),
                "rollout/stop_share": sum(f == "stop" for f in rollouts.finish_reasons) / len(rollouts),
                "rollout/tokens_per_s": rollouts.timing.tokens_per_s,
                **{f"time/{k}_s": v for k, v in timing.items()},
                "time/iteration_s": sum(timing.values()),
            }
        )
        if run.logger:
            run.logger.log(row, it)
        fault("ppo_iteration")  # an iteration logged, its checkpoint (if due) not yet written
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['reward/combined_mean']:.3f}",
            kl=f"{row['kl/ref_mean']:.3f}",
            heldout=f"{row.get('eval/reward_heldout', float('nan')):.3f}",
        )
        if state["stopped_early"] and ctx.is_main:
            print(
                f"[align] {ctx.name}: early stop at iteration {it}: no held-out gain in "
                f"{cfg.early_stop_patience} evaluations (best {state['best_heldout']:.4f} at iteration "
                f"{state['best_iteration']})",
                flush=True,
            )
        if it % cfg.save_every == 0 and it < cfg.iterations and not state["stopped_early"]:
            save_checkpoint(
                ctx.work_dir / CHECKPOINTS,
                run.learner,
                {**state, "moments": run.moments.state_dict()},
                ctx.rank,
            )
    bar.close()


# ---------------------------------------------------------------------------------------------------
# Save


def save(ctx: StageContext, run: Run) -> dict:
    """`model/` (merged, float32), `adapter/`, `value_head.safetensors`, `ppo_curve.png`; the summary."""
    trainable = run.learner.trainable_state()  # every rank: ZeRO-3 gathers
    summary: dict = {}
    if ctx.is_main:
        from peft import get_peft_model
        from safetensors.torch import save_file

        from align.models import load_causal_lm, peft_lora_config
        from align.ppo.policy import adapter_state, value_head_state

        if run.hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # the merge below runs on rank 0 alone, on full weights
        out = ctx.out_dir
        base = load_causal_lm(ctx.init_model_dir, "float32")
        peft_model = get_peft_model(base, peft_lora_config(ctx.stage_cfg.lora, base.config.num_hidden_layers))
        adapters = adapter_state(trainable)
        result = peft_model.load_state_dict(adapters, strict=False)
        wanted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or wanted - set(adapters):
            raise AlignError(
                f"ppo: the trained adapters do not fit a fresh LoRA model (unexpected "
                f"{result.unexpected_keys[:3]}, missing {sorted(wanted - set(adapters))[:3]})"
            )
        peft_model.save_pretrained(str(out / "adapter"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(out / "model"), safe_serialization=True)
        run.tokenizer.save_pretrained(str(out / "model"))
        save_file(value_head_state(trainable), str(out / "value_head.safetensors"))
        rows = read_metrics(ctx.work_dir / "logs" / "metrics.jsonl")
        plot_curve(rows, out / "ppo_curve.png", ctx.stage_cfg.kl_bound)
        summary = {**summarize(rows, run.state, str(ctx.run_dir / ctx.name / "model")), **run.data_stats}
    dist.barrier()
    return summary


def _heldout_change(state: dict) -> dict:
    """The last evaluation's held-out reward minus the one before training, prompt by prompt, with its 95%
    paired-bootstrap interval."""
    from align.stats import paired_change

    before, last = state.get("heldout_before_scores"), state.get("heldout_last_scores")
    if not before or not last:
        return {}
    c = paired_change(before, last)
    return {
        "eval/reward_heldout_change": c["change"],
        "eval/reward_heldout_change_lo": c["lo"],
        "eval/reward_heldout_change_hi": c["hi"],
        "eval/heldout_n": c["n"],
        "eval/within_noise": c["within_noise"],
    }


def summarize(rows: list[dict], state: dict, model_dir: str) -> dict:
    its = [r for r in rows if r["step"] >= 1]
    evals = [r for r in rows if r.get("eval/reward_heldout") is not None]

    def mean(key: str) -> float:
        vals = [r[key] for r in its if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {
        "iterations": state["iteration"],
        "stopped_early": bool(state["stopped_early"]),
        "reward/combined_first": its[0]["reward/combined_mean"] if its else float("nan"),
        "reward/combined_last": its[-1]["reward/combined_mean"] if its else float("nan"),
        "eval/reward_heldout_before": state["heldout_before"] if state["heldout_before"] is not None else float("nan"),
        "eval/reward_heldout_after": evals[-1]["eval/reward_heldout"] if evals else float("nan"),
        "eval/reward_heldout_best": state["best_heldout"] if state["best_heldout"] is not None else float("nan"),
        "eval/best_iteration": state["best_iteration"],
        **_heldout_change(state),
        "kl/ref_final": its[-1]["kl/ref_mean"] if its else float("nan"),
        "kl/ref_final_k3": its[-1]["kl/ref_k3_mean"] if its else float("nan"),
        "ppo/approx_kl_last": its[-1]["ppo/approx_kl"] if its else float("nan"),
        **{f"time/{p}_mean_s": mean(f"time/{p}_s") for p in PHASES},
        "time/iteration_mean_s": mean("time/iteration_s"),
        "model_dir": model_dir,
    }
    return summary


def plot_curve(rows: list[dict], path: Path, kl_bound: float | None = None) -> None:
    """Four panels: reward (training batch and held-out) and KL to the reference per iteration; the
    over-optimisation picture, held-out reward against KL at each evaluation (Llama 2 sec. 3.2.3, Gao et
    al. 2022); and the mean response length per iteration, where length hacking shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in rows if r["step"] >= 1]
    evals = [r for r in rows if r.get("eval/reward_heldout") is not None]
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(10, 7.5))
    ax1.plot([r["step"] for r in its], [r["reward/combined_mean"] for r in its], marker="o", label="batch LOGIT(Rc)")
    ax1.plot(
        [r["step"] for r in evals], [r["eval/reward_heldout"] for r in evals], marker="s", label="held-out LOGIT(Rc)"
    )
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("combined reward (before whitening)")
    ax1.legend()
    ax2.plot([r["step"] for r in its], [r["kl/ref_mean"] for r in its], marker="o", color="tab:red", label="k1")
    ax2.plot([r["step"] for r in its], [r["kl/ref_k3_mean"] for r in its], marker=".", color="tab:orange", label="k3")
    if kl_bound is not None:
        ax2.axhline(kl_bound, color="black", linewidth=0.8, linestyle="--", label="kl_bound")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("KL(pi || pi_0) per sequence (nats)")
    ax2.legend()
    # k3: never below 0, unlike k1's batch mean on a policy that has barely moved; before training: 0
    kl = [r.get("kl/ref_k3_mean", 0.0) if r["step"] >= 1 else 0.0 for r in evals]
    ax3.plot(kl, [r["eval/reward_heldout"] for r in evals], marker="s", color="tab:green")
    for x, r in zip(kl, evals):
        ax3.annotate(
            str(r["step"]), (x, r["eval/reward_heldout"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax3.set_xlabel("KL(pi || pi_0) per sequence at the evaluation (k3, nats)")
    ax3.set_ylabel("held-out LOGIT(Rc)")
    ax3.set_title("reward against KL (labels: iteration)", fontsize=9)
    ax4.plot([r["step"] for r in its], [r["rollout/response_length"] for r in its], marker="o", color="tab:purple")
    ax4.set_xlabel("iteration")
    ax4.set_ylabel("mean response length (tokens)")
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(alpha=0.3)
    fig.suptitle("PPO (Llama 2 sec. 3.2.3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def run_ppo(ctx: StageContext) -> dict:
    """The `ppo` stage: setup -> train -> save; returns the summary (rank 0; {} on other ranks)."""
    run = setup(ctx)
    try:
        train(ctx, run)
    finally:
        run.close()
    return save(ctx, run)
