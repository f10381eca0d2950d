"""DeepSpeed ZeRO-3 for the stages that run their own training loop (reward models, PPO).

`resolve_config` fills the "auto" values of the launch's ZeRO-3 JSON (align/launch) from a stage's batch
arithmetic; `DeepSpeedLearner` wraps the engine: one optimizer step per global batch, accumulated over
micro-batches and ranks. Build the model while a `transformers.integrations.HfDeepSpeedConfig` of the
resolved config is alive, after `align.launch.init_distributed()`: `from_pretrained` then partitions the
weights as they load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from align.errors import AlignError


def resolve_config(
    base: dict, micro_batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float, bf16: bool
) -> dict:
    """`base` (the launch's JSON) with its batch, clipping and precision values set.

    bf16 here is DeepSpeed's bf16 mode: bf16 weights in the forward and backward, fp32 master copies
    in the optimizer.
    """
    return {
        **base,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bool(bf16)},
        # a torch AdamW (the recipe's betas/eps) rather than DeepSpeed's JIT-built one
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def param_ndim(p: torch.nn.Parameter) -> int:
    """Dimensions of a parameter, also when ZeRO-3 has partitioned it (its data is then an empty 1-d
    tensor; `ds_shape` keeps the full shape)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


class DeepSpeedLearner:
    """ZeRO-3 over all processes (gloo on CPU, NCCL on GPUs).

    Gradient scale: each shard's loss is normalised by the GLOBAL batch's count (tokens, pairs), so the
    wanted gradient is the SUM over micro-batches and ranks; DeepSpeed divides by the accumulation
    steps (not asked for here: `scale_wrt_gas=False`) and AVERAGES over ranks, hence the x world_size.

    Args:
        net: the model, built while the `HfDeepSpeedConfig` of `ds_config` was alive.
        optimizer: a torch optimizer over `net`'s trainable parameters; its param groups' `lr` is read at
            every step, so an LR scheduler built on it works as in one process.
        ds_config: `resolve_config(...)`.
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
        self.net = self.engine.module
        self.module = self.engine  # what is called for a forward
        self.device = self.engine.device

    def accumulate(self, loss: torch.Tensor, boundary: bool) -> Optional[float]:
        """Backward `loss` (this micro-batch's share, normalised by the global batch's count); at the
        step's last micro-batch (`boundary`) clip and step. Returns the pre-clip global grad norm then."""
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise AlignError(
                "DeepSpeed's accumulation boundary and the optimizer step disagree; this is a bug "
                "(micro_batch_size, the batch size and num_processes went out of step)"
            )
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()  # steps (clips, updates) at the boundary only
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def trainable_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The fp32 master copies of the trainable parameters, gathered, by name; on rank 0 (None
        elsewhere). Every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self._trainable():
            full = safe_get_full_fp32_param(p)  # collective under ZeRO-3
            if self.rank == 0:
                out[n] = full.detach().float().cpu().clone()
        return out if self.rank == 0 else None

    def save(self, directory: Path, gathered: bool = True) -> None:
        """Every rank writes its partition of the weights and optimizer (DeepSpeed's layout under `ds/`);
        with `gathered`, rank 0 also writes the gathered trainable tensors (readable without DeepSpeed)."""
        from safetensors.torch import save_file

        self.engine.save_checkpoint(str(directory), tag="ds", save_latest=False, exclude_frozen_parameters=True)
        state = self.trainable_state() if gathered else None
        if state is not None:
            save_file(state, str(directory / "trainable.safetensors"))

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag="ds", load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise AlignError(f"{directory}: DeepSpeed could not load this checkpoint; delete it to start over")
