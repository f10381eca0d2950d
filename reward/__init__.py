"""Reward models: their losses, the combined PPO reward, the model wrapper, training and evaluation.

`reward.losses` and `reward.combined` import only torch, so the math can be tested and reused without
transformers, PEFT or vLLM.
"""
