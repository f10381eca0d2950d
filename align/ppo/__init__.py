"""PPO on the Llama 2 combined reward (sec. 3.2.3), vLLM rollouts, LoRA policy under ZeRO-3."""
