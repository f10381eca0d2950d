"""Rejection-sampling fine-tuning (Llama 2 sec. 3.2.3): best-of-K by the combined reward, pooled over rounds."""
