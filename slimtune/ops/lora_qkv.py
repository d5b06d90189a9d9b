"""Attention input projections q, k, v as one fused op that saves X once (o goes through `lora_linear`).

The autograd Function lives in slimtune/kernels/lora_qkv.py; each projection is a `LoRAProjection` (frozen NF4 or
dense base, optional bias, optional adapter: any of q/k/v may have none, e.g. PEFT's default q,v targets).
"""

from __future__ import annotations

import torch

from slimtune.ops.lora_linear import LoRAProjection, lora_linear_reference

__all__ = ["lora_qkv", "lora_qkv_reference"]


def lora_qkv(
    x: torch.Tensor,
    *,
    q: LoRAProjection,
    k: LoRAProjection,
    v: LoRAProjection,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q(x), k(x), v(x)) for x (..., hidden); X is saved once (and only if an adapter needs dA or dm)."""
    from slimtune.kernels.lora_qkv import lora_qkv_fused
    from slimtune.ops.dispatch import resolve_backend

    lead = x.shape[:-1]
    outs = lora_qkv_fused(x.reshape(-1, x.shape[-1]), q=q, k=k, v=v, backend=resolve_backend(x, backend))
    return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)


def lora_qkv_reference(
    x: torch.Tensor, *, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula in plain autograd (materialises W; everything in `dtype`, default x.dtype)."""
    return tuple(lora_linear_reference(x, p, dtype=dtype) for p in (q, k, v))
