"""Helpers shared by the adapter tests (importable because pytest puts this folder on sys.path)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.models.load import QuantConfig, prepare_loaded


def tiny_base(quant: str = "none", seed: int = 0, layers: int = 1):
    """A tiny Llama (hidden 64, MLP 136, 4/2 heads, vocab 300) on CPU, NF4-quantized when ``quant="nf4"``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return prepare_loaded(model, None, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny").model
