"""One rank of the 2-process ZeRO-3 PPO update in test_ppo_stage.py (run under `accelerate launch`).

    ppo_update_worker.py MODEL_DIR TRAJECTORY.pt CONFIG.json DS_ZERO3.json OUT_DIR

Builds the policy exactly as the stage does (seeded LoRA, zero value head) under ZeRO-3, runs
`ppo_update` on the saved trajectory and, on rank 0, writes the per-step metrics and the trained
adapters + head to OUT_DIR.
"""

import json
import sys
from pathlib import Path

import torch


def main(model_dir: str, traj_path: str, cfg_path: str, ds_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers.integrations import HfDeepSpeedConfig

    from align.config import PPOConfig
    from align.configlib import build
    from align.launch import init_distributed
    from align.ppo.core import Trajectory
    from align.launch.zero3 import DeepSpeedLearner
    from align.ppo.policy import build_policy, deepspeed_config, make_optimizer
    from align.ppo.train import ppo_update

    init_distributed()
    cfg = build(PPOConfig, json.loads(Path(cfg_path).read_text()))
    ds = deepspeed_config(json.loads(Path(ds_path).read_text()), cfg, dist.get_world_size(), bf16=False)
    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (ZeRO-3 loading while alive)
    net = build_policy(model_dir, cfg.lora, "float32", seed=0)
    learner = DeepSpeedLearner(net, make_optimizer(net, cfg), ds)
    traj = Trajectory.from_state_dict(torch.load(traj_path, weights_only=True))
    _, steps = ppo_update(learner, traj, cfg, seed=1, autocast=False, iteration=1)
    state = learner.trainable_state()
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "steps.json").write_text(json.dumps(steps))
        save_file(state, str(out / "trainable.safetensors"))
    dist.barrier()
    dist.destroy_process_group()  # exiting with the group alive aborted now and then (align.pipeline.leave_together)


if __name__ == "__main__":
    main(*sys.argv[1:6])
