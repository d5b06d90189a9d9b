"""The benchmark's inputs: a causal LM from a config with seeded random weights (its decoder linears quantized on
the device), and random token ids. Both tools of ``slimtune bench`` start from exactly these."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.models.load import quantize_linears


def random_tokens(vocab: int, batch: int, seq_len: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """(batch, seq_len) int64 token ids, uniform over the vocabulary, from a fixed seed (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)


def random_base(config, *, device: torch.device, dtype: torch.dtype, quant: str = "nf4", double_quant: bool = True,
                seed: int = 0) -> nn.Module:
    """A causal LM from ``config`` with seeded random weights, its decoder linears quantized on ``device``.

    Built on the meta device, materialised on the CPU (normal(0, initializer_range) for matrices, ones for norms,
    zeros for biases: the same values for the same seed), then each decoder linear is quantized straight onto the
    device (``quantize_linears``) and the rest moved there, so the device never holds a dense copy of the weights.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device="cpu")
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
    # non-persistent buffers (rotary inv_freq) are lost by to_empty: rebuild the modules that own them
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, type(module)(config=model.config))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if quant != "none":
        quantize_linears(model, mode=quant, compute_dtype=dtype, double_quant=double_quant, device=device)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model.train()
    return model
