"""Trainable-parameter counts of any adapter kind on any model config, without allocating a single weight.

The model is built on the meta device (shapes only) and the real injection code runs on it — kinds skip their
data-dependent initialisation there (SVD, Nyström, spectrum) — so the count is the one a real run would report:

    >>> from transformers import LlamaConfig
    >>> trainable_counts(LlamaConfig(...Llama-2-7B...), "lora", 16)
    39976960
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import LayerRange, get_adapter_class
from slimtune.adapters.inject import inject

__all__ = ["meta_model", "trainable_counts"]


def meta_model(config: Any) -> nn.Module:
    """A causal LM from a transformers config with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trainable_counts(
    config: Any,
    kind: str,
    rank: int,
    targets: str | list[str] = "all-linear",
    layers: LayerRange | dict | list[int] | None = None,
    *,
    at_end: bool = False,
    **kind_options: Any,
) -> int:
    """Number of trainable adapter parameters of ``kind`` at ``rank`` on the model ``config`` describes.

    ``kind_options`` are the kind's own config fields (e.g. ``alpha``, ``modules_to_save``, ``init``). With
    ``at_end`` every adapter first gets ``on_step(T, T)``, i.e. the count after training (LaMDA: B frozen, S only).
    """
    model = meta_model(config)
    cls = get_adapter_class(kind)
    cfg = cls.Config.model_validate({"kind": kind, "rank": rank, "targets": targets, "layers": layers, **kind_options})
    adapters = inject(model, cfg)
    if at_end:
        for a in adapters.values():
            a.on_step(1000, 1000)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
