"""Multi-process launch: accelerate + DeepSpeed ZeRO-3 (gloo on CPU, NCCL on GPUs).

Several machines: `ALIGN_ACCELERATE_CONFIG` names an accelerate config (configs/launch/zero3-2x8gpu.yaml)
whose machine keys (`MACHINE_KEYS`) go into every generated launch config; `ALIGN_MACHINE_RANK`
overrides its machine_rank on each node (docs/gpu.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from align.io import write_json_atomic, write_text_atomic


def deepspeed_config(tcfg) -> dict:
    """The ZeRO-3 config; batch values are 'auto' so the Trainer's (from our TrainConfig) are used."""
    return {
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            # Checkpoints are saved as full (gathered) weights that load with from_pretrained.
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # PLATFORM.md: with accelerate + a DeepSpeed config file, bf16 is "auto" here and mixed
        # precision is left out of the accelerate config.
        "bf16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


MACHINE_KEYS = ("num_machines", "machine_rank", "main_process_ip", "main_process_port", "rdzv_backend", "same_network")
PLACEHOLDER_IP = "MAIN_NODE_IP"


def machine_settings(path: str | Path | None = None, env: dict | None = None) -> dict:
    """The machine keys of the accelerate config at `path` (default: $ALIGN_ACCELERATE_CONFIG; none:
    {}), with $ALIGN_MACHINE_RANK as machine_rank when set. Refuses the shipped placeholder address."""
    from align.errors import AlignError

    env = os.environ if env is None else env
    path = path or env.get("ALIGN_ACCELERATE_CONFIG")
    if not path:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    out = {k: raw[k] for k in MACHINE_KEYS if k in raw}
    if env.get("ALIGN_MACHINE_RANK"):
        out["machine_rank"] = int(env["ALIGN_MACHINE_RANK"])
    if out.get("num_machines", 1) > 1 and out.get("main_process_ip", PLACEHOLDER_IP) == PLACEHOLDER_IP:
        raise AlignError(
            f"{path}: main_process_ip is not set (placeholder {PLACEHOLDER_IP!r}): put node 0's address there"
        )
    return out


def write_launch_files(directory: Path, num_processes: int, tcfg, machines: dict | None = None) -> Path:
    """Write the DeepSpeed JSON and the accelerate config that points at it; return the latter.
    `num_processes` counts the ranks of every machine; `machines` (default: `machine_settings()`) sets
    the multi-machine keys."""
    directory.mkdir(parents=True, exist_ok=True)
    ds_json = directory / "ds_zero3.json"
    write_json_atomic(ds_json, deepspeed_config(tcfg))
    acc = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(ds_json.resolve()), "zero3_init_flag": False},
        "num_machines": 1,
        "num_processes": num_processes,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        **(machine_settings() if machines is None else machines),
    }
    acc_yaml = directory / "accelerate.yaml"
    write_text_atomic(acc_yaml, yaml.safe_dump(acc, sort_keys=False))
    return acc_yaml


def init_distributed() -> None:
    """Initialise DeepSpeed's process group before any model is built under ZeRO-3.

    transformers builds the model inside `deepspeed.zero.Init` as soon as a ZeRO-3 Trainer config
    exists; if DeepSpeed's own comm layer is not yet up it sees a world of 1 and its batch check fails
    (micro x accumulation x 1 != the global batch). gloo on CPU, NCCL on GPUs (DeepSpeed's default).
    """
    import deepspeed

    deepspeed.init_distributed()


def start_sampling_ranks(key: str, num_processes: int, rollout) -> None:
    """Bring up the process group of a stage that samples on rank 0 and trains on every rank (rejection
    sampling, PPO, GAtt). ``key`` names the stage's num_processes key for the error. An in-process vLLM
    engine on rank 0 would join the ranks' torch.distributed world and hang there, so it is refused."""
    from align.errors import AlignError

    if rollout.engine == "vllm" and rollout.in_process:
        raise AlignError(
            f"{key}={num_processes} needs rollout.in_process=false: an in-process vLLM engine on rank 0 "
            "joins the ranks' torch.distributed world and hangs there"
        )
    init_distributed()


def release_zero3_loading() -> None:
    """After a ZeRO-3 Trainer (align.sft.train_sft) has finished, let `from_pretrained` load whole models
    again. The Trainer's DeepSpeed config stays registered with transformers while anything still holds
    it, and a model loaded then by one rank alone (rank 0's reward models or engine reference) would be
    partitioned over ranks that are not loading it, and wait for them forever."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
