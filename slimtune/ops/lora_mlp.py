"""LoRA SwiGLU MLP: out = down(silu(gate(X)) ⊙ up(X)), each projection a frozen base (NF4 or dense) + adapter.

One autograd Function (slimtune/kernels/lora_mlp.py) saves X, e = gate(X), g = up(X) (plus the (T, r) X Aᵀ of each
adapter), recomputes h = silu(e) ⊙ g in backward, and writes dh into h's buffer and de, dg into e's and g's. This
module holds the public op, the readable formula (`lora_mlp_reference`, ground truth in tests) and the plain-torch
SwiGLU pieces the Function runs on the torch backend (the Triton ones have the same signatures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtune.ops.lora_linear import LoRAProjection, lora_linear_reference

__all__ = ["lora_mlp", "lora_mlp_reference", "swiglu", "swiglu_backward_"]


def lora_mlp(
    x: torch.Tensor,
    *,
    gate: LoRAProjection,
    up: LoRAProjection,
    down: LoRAProjection,
    backend: str | None = None,
    inplace_input_grad: bool = False,
) -> torch.Tensor:
    """SwiGLU MLP for x (..., hidden) -> (..., hidden) through one fused autograd Function.

    `inplace_input_grad=True` writes dX into X's storage once X is dead (X must be an intermediate activation that
    nothing else saved for backward, e.g. an RMSNorm output whose backward keeps its own input; autograd's version
    check raises if another saved it).
    """
    from slimtune.kernels.lora_mlp import lora_mlp_fused
    from slimtune.ops.dispatch import resolve_backend

    lead = x.shape[:-1]
    y = lora_mlp_fused(
        x.reshape(-1, x.shape[-1]), gate=gate, up=up, down=down, backend=resolve_backend(x, backend),
        inplace_input_grad=inplace_input_grad,
    )
    return y.reshape(*lead, y.shape[-1])


def lora_mlp_reference(
    x: torch.Tensor, *, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The formula in plain autograd (materialises W; everything in `dtype`, default x.dtype)."""
    e = lora_linear_reference(x, gate, dtype=dtype)
    g = lora_linear_reference(x, up, dtype=dtype)
    return lora_linear_reference(F.silu(e) * g, down, dtype=dtype)


def swiglu(e: torch.Tensor, g: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(e) ⊙ g, computed in fp32, stored in e's dtype."""
    h = (F.silu(e.float()) * g.float()).to(e.dtype)
    return h if out is None else out.copy_(h)


def swiglu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> None:
    """In place: e <- de = dh ⊙ g ⊙ silu'(e),  g <- dg = dh ⊙ silu(e);  silu'(e) = σ(e)·(1 + e·(1 − σ(e)))."""
    ef, gf, dhf = e.float(), g.float(), dh.float()
    sig = torch.sigmoid(ef)
    dg = dhf * ef * sig
    de = dhf * gf * sig * (1.0 + ef * (1.0 - sig))
    e.copy_(de)
    g.copy_(dg)
