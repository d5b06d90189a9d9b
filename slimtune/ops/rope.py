"""Rotary position embedding (RoPE), HF "rotate_half" convention, applied to q and k together.

Layout: q (B, T, Hq, D), k (B, T, Hk, D) — any strides (a view of a fused qkv output is fine);
cos, sin (T, D) or (B|1, T, D) as HF's rotary module returns them (the two halves of D hold the same angles).
With q = [q1, q2] split at D/2 and cos = [c1, c2], sin = [s1, s2]:

    forward:   out1 = q1·c1 − q2·s1          out2 = q2·c2 + q1·s2
    backward:  dq1  = d1·c1 + d2·s2           dq2  = d2·c2 − d1·s1     (the transpose: a rotation by −θ)

Nothing is saved for backward but cos and sin (shared by every layer). ``rope`` is the public op; one autograd
Function (:class:`RoPEFunction`) runs either backend's primitive: ``rope_torch`` here, or ``rope_triton`` from
slimtune/kernels/rope.py (same signature), reached only through ``slimtune.ops.dispatch.triton_module``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimtune.ops.autotune import autograd_trial
from slimtune.ops.dispatch import resolve_backend, triton_module

__all__ = ["rope", "rope_ref", "rope_torch", "RoPEFunction"]


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B|1, T, D); ``backward=True`` applies the transpose. fp32 math."""
    half = x.shape[-1] // 2
    c = cos.float()[:, :, None, :]  # (B|1, T, 1, D)
    s = sin.float()[:, :, None, :]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    if not backward:
        out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    else:
        out = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    return out.to(x.dtype)


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, *, backward: bool,
) -> None:
    """The torch primitive: rotate q (B, T, Hq, D) into q_out and k (B, T, Hk, D) into k_out (may alias)."""
    q_out.copy_(rope_ref(q, cos, sin, backward=backward))
    k_out.copy_(rope_ref(k, cos, sin, backward=backward))


def primitive(backend: str) -> Callable[..., None]:
    """``rope_torch`` or the Triton launcher (the kernels module is imported only for ``"triton"``)."""
    return rope_torch if backend == "torch" else triton_module("rope").rope_triton


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    """(B, T, H, D) as is, (B, T, H*D) viewed as (B, T, H, D)."""
    return t if t.dim() == 4 else t.unflatten(-1, (t.shape[-1] // d, d))


class RoPEFunction(torch.autograd.Function):
    """apply(q, k, cos, sin, head_dim, inplace, rotate) -> (q_rot, k_rot). Saves cos and sin only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, head_dim: int, inplace: bool, rotate: Callable[..., None]):
        q_out = q if inplace else torch.empty_like(q)
        k_out = k if inplace else torch.empty_like(k)
        rotate(_heads(q, head_dim), _heads(k, head_dim), _heads(q_out, head_dim), _heads(k_out, head_dim), cos, sin,
               backward=False)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.rotate, ctx.head_dim = rotate, head_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        d = ctx.head_dim
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        ctx.rotate(_heads(dq, d), _heads(dk, d), _heads(dq_in, d), _heads(dk_in, d), cos, sin, backward=True)
        return dq_in, dk_in, None, None, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to q and k; returns (q_rot, k_rot) with the shapes of q and k.

    q (B, T, Hq, D) and k (B, T, Hk, D), or flat q (B, T, Hq·D) and k (B, T, Hk·D) with ``head_dim=D``.
    ``inplace=True`` rotates q and k in their own memory (the Function marks them dirty). That is safe when nothing
    else saved them for backward, e.g. the outputs of the fused qkv projection. Autograd allows it only for tensors
    that are neither views nor leaves requiring grad; for those the op runs out of place (same result). Pass the
    flat (B, T, H·D) projection outputs to get the in-place path.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    d = q.shape[-1] if head_dim is None else int(head_dim)
    if q.dim() != k.dim() or q.dim() not in (3, 4) or (q.dim() == 3) != (head_dim is not None):
        raise ValueError("rope: q, k must be (B, T, H, D), or (B, T, H*D) with head_dim given")
    if d % 2 or d != cos.shape[-1] or q.shape[-1] % d or k.shape[-1] % d:
        raise ValueError(f"rope: head dims of q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} differ")
    if inplace and any((t.is_leaf and t.requires_grad) or t._base is not None for t in (q, k)):
        inplace = False
    trial = autograd_trial(lambda b, q, k: rope(q, k, cos=cos, sin=sin, head_dim=head_dim, backend=b), (q, k))
    b = resolve_backend(q, backend, op="rope", trial=trial)  # auto: measured (helper A)
    return RoPEFunction.apply(q, k, cos, sin, d, inplace, primitive(b))
