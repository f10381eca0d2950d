"""The trained PPO model and its optimiser, on one process or under DeepSpeed ZeRO-3.

The model (`PolicyWithValue`): the policy is the starting checkpoint with LoRA adapters; the value
function is a linear head on the policy's last hidden state (post final norm), and the reference policy
pi_0 is the same network with its adapters switched off (`peft`'s `disable_adapter()`), so neither a
reference copy nor a value network is held.

Why a value head on the policy and not a separate value model (e.g. one initialised from the reward
model, as InstructGPT did): on these 2-core CPUs the forward/backward passes are the cost, and a
separate value network doubles them (and its weights: another model under ZeRO-3); the head reads the
hidden states of the forward the policy loss needs anyway. The price is coupling: the value loss
reaches the LoRA adapters. It is kept small by `vf_coef` and by a zero-initialised head (no gradient
reaches the adapters through it at first). The reward models cannot seed the head: their backbones are
other checkpoints (the RM stages), not the policy's.

Optimiser (Llama 2 sec. 3.2.3): AdamW, betas (0.9, 0.95), eps 1e-5, weight decay 0.1 on matrices (not
on the head's bias), gradient clipping 1.0, constant learning rate (align/schedule.py's scheduler with no
warm-up and a floor of 1: `lr_scheduler`). One optimizer step per
mini-batch; the mini-batch may be accumulated over micro-batches (`align.launch.local.LocalLearner.accumulate`) and
processes (`align.launch.zero3.DeepSpeedLearner`, shared with the reward-model loop).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.launch.local import AdamW, LocalLearner


VALUE_HEAD = "value_head"
POLICY_PREFIX = "policy."


class PolicyWithValue(torch.nn.Module):
    """A PEFT-LoRA causal LM plus a scalar value head on its last hidden state."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy  # peft.PeftModel
        self.value_head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values at positions start .. start + length - 1.

        Args:
            input_ids: (b, S) long, any mix of left and right padding.
            attention_mask: (b, S), 1 = a real token; position ids are derived from it, so padding
                does not shift the positions of real tokens.
            start, length: the window whose hidden states are read (the positions that predict the
                response tokens): logits are only computed there.

        Returns:
            logits (b, length, V) in the compute dtype; values (b, length) float32.
        """
        lm = self.policy.get_base_model()
        backbone = getattr(lm, lm.base_model_prefix)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, start : start + length]
        # Contiguous first: on a strided 3-d slice, torch's linear falls back to a batched matmul that
        # copies the (V, H) head once per row (about half of a log-prob pass: docs/ppo.md).
        hidden = hidden.contiguous()
        logits = lm.lm_head(hidden)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    @contextlib.contextmanager
    def reference(self):
        """The reference policy pi_0 inside the block: the same network with the LoRA adapters off."""
        with self.policy.disable_adapter():
            yield


def build_policy(
    model_dir: str | Path, lora, base_dtype: str, seed: int, gradient_checkpointing: bool = False
) -> PolicyWithValue:
    """The starting checkpoint with fresh LoRA adapters (seeded) and a zero value head.

    Under ZeRO-3 call it while an `HfDeepSpeedConfig` is alive: the base weights are then partitioned as
    they load. Adapters and head are float32 whatever `base_dtype` (the frozen weights' dtype).
    ``gradient_checkpointing``: transformers' own, non-reentrant (no input needs a gradient for the
    adapters' to flow); it acts in train mode, i.e. in the update, not in the log-prob passes.
    """
    from peft import get_peft_model

    from align.models import load_causal_lm, peft_lora_config

    lm = load_causal_lm(model_dir, base_dtype)
    lm.config.use_cache = False
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # the adapters' initialisation: the same on every rank and every run
    policy = get_peft_model(lm, peft_lora_config(lora, lm.config.num_hidden_layers))
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return PolicyWithValue(policy, lm.config.hidden_size)


def adamw(cfg) -> "AdamW":
    """The PPO config's AdamW; no weight decay on 1-d tensors (the head's bias)."""
    from align.launch.local import AdamW

    return AdamW(cfg.lr, tuple(cfg.adam_betas), cfg.adam_eps, cfg.weight_decay)


def make_optimizer(net: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, for `align.launch.zero3.DeepSpeedLearner`."""
    return adamw(cfg).build(p for p in net.parameters() if p.requires_grad)


def steps_per_iteration(cfg) -> int:
    """Optimizer steps of one iteration: `ppo_epochs` passes over its rows in mini-batches."""
    return cfg.ppo_epochs * (cfg.prompts_per_iteration // cfg.mini_batch_size)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg, iteration: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The PPO config's lr as align/schedule.py's scheduler: constant (no warm-up, floor 1, so
    `lr_factor` is 1 at every step). `optimizer`: the torch optimizer (under ZeRO-3 the one handed to
    `DeepSpeedLearner`); `iteration`: the iterations already trained, for a resumed run. `ppo_update`
    steps it after every mini-batch."""
    from align.schedule import lr_scheduler as scheduler

    per = steps_per_iteration(cfg)
    return scheduler(optimizer, 0, cfg.iterations * per, 1.0, start=iteration * per)


def torch_learner(net: "PolicyWithValue", cfg, device: str = "cpu") -> "LocalLearner":
    """One process: `align.launch.local.LocalLearner` (the reward models' too) with the config's AdamW.
    The adapters and the value head train in float32 over a frozen base in the run's precision."""
    from align.launch.local import LocalLearner

    return LocalLearner(net, adamw(cfg), cfg.max_grad_norm, device)


def adapter_state(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a trainable state, named as in the bare `PeftModel`."""
    return {k[len(POLICY_PREFIX) :]: v for k, v in trainable.items() if k.startswith(POLICY_PREFIX)}


def value_head_state(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(VALUE_HEAD) + 1 :]: v for k, v in trainable.items() if k.startswith(VALUE_HEAD + ".")}


def deepspeed_config(base: dict, cfg, world_size: int, bf16: bool) -> dict:
    """The launch's ZeRO-3 JSON (align/launch) with its "auto" values filled from the PPO config."""
    from align.launch.zero3 import resolve_config

    gas = cfg.mini_batch_size // (cfg.micro_batch_size * world_size)
    return resolve_config(base, cfg.micro_batch_size, gas, world_size, cfg.max_grad_norm, bf16)
