"""align: the Llama 2-Chat alignment recipe as one staged, config-driven pipeline."""

__version__ = "0.1.0"
