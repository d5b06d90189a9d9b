"""Activation (gradient) checkpointing of decoder layers: none | full | offload.

full: each decoder layer is recomputed in backward; only its input is kept. offload: the same, with the kept layer
inputs moved to pinned CPU memory (``save_on_cpu`` wraps the checkpoint, whose only saved tensors are the layer's
inputs) and copied back when backward reaches the layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _offloaded_checkpoint(fn, *args, **kwargs):
    pin = torch.cuda.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module, mode: str) -> int:
    """Turn on checkpointing for every module that supports it (HF GradientCheckpointingLayer). Returns how many."""
    if mode == "none":
        return 0
    fn = _offloaded_checkpoint if mode == "offload" else functools.partial(checkpoint, use_reentrant=False)
    count = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = fn
            module.gradient_checkpointing = True
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "config"):
        model.config.use_cache = False
    return count
