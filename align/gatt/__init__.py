"""Ghost Attention (Llama 2 sec. 3.3): system instructions that hold across many turns."""
