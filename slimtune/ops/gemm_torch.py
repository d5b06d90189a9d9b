"""The "torch" backend of the base GEMMs: the readable plain-torch primitives (and the reference of the others).

An adapted projection needs four operations that touch the frozen base W (out, in); every backend provides them
with these names and signatures (slimtune/ops/gemm_dequant.py: dequant + vendor GEMM with reused buffers;
slimtune/kernels/qlora_linear.py: one Triton GEMM with W dequantized in registers):

    base_matmul(x, base, ...)      (x Wᵀ + s·L R)·out_scale + bias        forward; L R = the LoRA term
    base_matmul_t(dy, base, ...)   (dy·out_scale) W + L R                  dX in backward
    base_dmag(x, dy, base, ...)    Σ_t dy ⊙ (x Wᵀ + s·L R)                 DoRA magnitude gradient (× 1/n)
    base_row_norm_sq(base)         ‖W_o‖² per output row                   DoRA norm

x and dy are 2-D; results are in x's dtype. Here W is dequantized into a fresh tensor on every call (`dense_weight`).
"""

from __future__ import annotations

import torch

from slimtune.ops.nf4 import NF4Weight, dense_weight

__all__ = ["base_matmul", "base_matmul_t", "base_dmag", "base_row_norm_sq"]

Base = NF4Weight | torch.Tensor


def base_matmul(
    x: torch.Tensor,
    base: Base,
    *,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x Wᵀ + lora_scale · lora_left @ lora_right) · out_scale + bias.

    x (T, in); lora_left (T, r); lora_right (r, out); out_scale, bias (out,) -> (T, out) in x's dtype.
    """
    y = x @ dense_weight(base, x.dtype).T
    if lora_left is not None:
        y += lora_scale * (lora_left @ lora_right.to(x.dtype))
    if out_scale is not None:
        y = (y.float() * out_scale).to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    if out is not None:
        return out.copy_(y)
    return y


def base_matmul_t(
    dy: torch.Tensor,
    base: Base,
    *,
    out_scale: torch.Tensor | None = None,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """(dy · out_scale) @ W + lora_left @ lora_right, added to `out` when `accumulate`.

    dy (T, out); out_scale (out,); lora_left (T, r); lora_right (r, in) -> (T, in) in dy's dtype.
    """
    if out_scale is not None:
        dy = (dy.float() * out_scale).to(dy.dtype)
    dx = dy @ dense_weight(base, dy.dtype)
    if lora_left is not None:
        dx += lora_left @ lora_right.to(dy.dtype)
    if out is None:
        return dx
    return out.add_(dx) if accumulate else out.copy_(dx)


def base_dmag(
    x: torch.Tensor,
    dy: torch.Tensor,
    base: Base,
    *,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Σ_t dy ⊙ (x Wᵀ + lora_scale · lora_left @ lora_right): fp32 (out,). The recomputed z never leaves here."""
    z = base_matmul(x, base, lora_left=lora_left, lora_right=lora_right, lora_scale=lora_scale)
    return (dy.float() * z.float()).sum(0)


def base_row_norm_sq(base: Base) -> torch.Tensor:
    """‖W_o‖² per output row, fp32 (out,)."""
    return dense_weight(base, torch.float32).square().sum(1)
