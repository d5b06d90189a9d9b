"""RMSNorm: y = (offset + w) · x / sqrt(mean(x²) + eps), over the last dimension.

``offset`` is 0 for Llama/Mistral/Qwen norms and 1 for Gemma's ``(1 + w)`` norm. Output dtype follows HF:
promote(x, w) without an offset (``w * x̂.to(x.dtype)``), x's dtype with one (Gemma computes in fp32 and casts last).
Inputs of any rank normalise their last dimension, so the (B, T, heads, head_dim) q/k norms of Qwen3 and Gemma 3
use the same op.

``rms_norm`` is the public op: one autograd Function (:class:`RMSNormFunction`) that receives the primitives of
the chosen backend (the ``*_ref`` functions here, or their Triton twins in slimtune/kernels/rms_norm.py, reached
only through ``slimtune.ops.dispatch.triton_module``). The ``*_ref`` functions are the readable ground truth the
torch backend runs and the tests compare to.

What the Function saves for backward: the inverse RMS per row (fp32) and either x (``save="input"``, the default)
or the output y (``save="output"``). With y, backward recovers x̂ = x·rstd = y / (offset + w), and since the next
op (the fused q/k/v projection, the fused MLP) saves y as its own input anyway, the norm then costs no activation
memory beyond rstd. ``save="output"`` needs offset + w without zeros (x̂ is lost there); ``FusedRMSNorm`` checks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from slimtune.ops.autotune import autograd_trial
from slimtune.ops.dispatch import resolve_backend, triton_module

__all__ = ["rms_norm", "rms_norm_forward_ref", "rms_norm_backward_ref", "RMSNormFunction", "RMSNormPrimitives"]


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    return x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)


def rms_norm_forward_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, N), weight (N,) -> y (n, N), rstd (n,) fp32. Math in fp32 (HF's op order), one cast at the end."""
    xf = x.float()  # (n, N)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)  # (n,)
    w = weight.float() if not offset else offset + weight.float()
    y = (xf * rstd[:, None] * w).to(_out_dtype(x, weight, offset))  # (n, N)
    return y, rstd


def rms_norm_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    *,
    need_dw: bool,
    from_output: bool = False,
    dx_dtype: torch.dtype | None = None,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of rms_norm_forward_ref. dy, x (n, N); rstd (n,) -> dx (n, N), dw (N,) or None.

    With x̂ = x·rstd, w' = offset + w and g = w'·dy:  dx = rstd · (g − x̂ · mean(g · x̂)),  dw = Σ_rows dy · x̂.
    ``from_output``: the ``x`` argument holds the output y = x̂·w' instead, and x̂ = y / w'.
    dx is in ``dx_dtype`` (default: the dtype of the ``x`` argument).
    """
    r = rstd[:, None]  # (n, 1)
    w = weight.float() + offset  # (N,)
    if from_output:
        xhat = torch.where(w != 0, x.float() / w, 0.0)  # (n, N)
    else:
        xhat = x.float() * r  # (n, N)
    g = dy.float() * w  # (n, N)
    c = (g * xhat).mean(dim=-1, keepdim=True)  # (n, 1)
    dx = (r * (g - xhat * c)).to(dx_dtype or x.dtype)
    dw = (dy.float() * xhat).sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormPrimitives(NamedTuple):
    """The two functions a backend provides (same signatures as the ``*_ref`` ones)."""

    forward: object
    backward: object


TORCH_PRIMITIVES = RMSNormPrimitives(rms_norm_forward_ref, rms_norm_backward_ref)


def primitives(backend: str) -> RMSNormPrimitives:
    """The primitives of ``"torch"`` or ``"triton"`` (the kernels module is imported only for the latter)."""
    if backend == "torch":
        return TORCH_PRIMITIVES
    k = triton_module("rms_norm")
    return RMSNormPrimitives(k.rms_norm_forward_triton, k.rms_norm_backward_triton)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (n, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """apply(x, weight, eps, offset, save_output, prims) -> y. Saves rstd (n,) and x, or y when ``save_output``."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, save_output: bool, prims: RMSNormPrimitives):
        x2 = _rows(x)
        y, rstd = prims.forward(x2, weight, eps, offset)
        y = y.view(x.shape)
        ctx.save_for_backward(y if save_output else x2, weight, rstd)
        ctx.prims, ctx.offset, ctx.save_output, ctx.x_dtype = prims, offset, save_output, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved, weight, rstd = ctx.saved_tensors
        dx, dw = ctx.prims.backward(
            _rows(dy), _rows(saved), weight, rstd, need_dw=ctx.needs_input_grad[1], from_output=ctx.save_output,
            dx_dtype=ctx.x_dtype, offset=ctx.offset,
        )
        return dx.view(dy.shape), dw, None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    save: str = "input",
    backend: str | None = None,
    offset: float = 0.0,
) -> torch.Tensor:
    """RMSNorm of x (..., N) with weight (N,) (trainable or frozen); y = x̂ · (offset + w).

    Returns (..., N): promote(x, weight) dtype when ``offset == 0``, x's dtype otherwise (Gemma, ``offset=1.0``).
    ``save="output"`` keeps y instead of x for backward (see the module docstring; offset + w must have no zeros).
    """
    if save not in ("input", "output"):
        raise ValueError(f"rms_norm: save must be 'input' or 'output', not {save!r}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    trial = autograd_trial(lambda b, x, w: rms_norm(x, w, eps=eps, save=save, backend=b, offset=offset), (x, weight),
                           rows=1)  # tokens cut to autotune.MAX_TRIAL_ROWS
    prims = primitives(resolve_backend(x, backend, op="rms_norm", trial=trial))  # auto: measured (helper A)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), save == "output", prims)
