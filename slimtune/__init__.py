"""slimtune: memory-efficient single-GPU fine-tuning of LLMs on 4-bit bases."""

__version__ = "0.1.0"
