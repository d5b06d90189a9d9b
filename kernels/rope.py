"""RoPE: Triton kernel, launcher and the autograd Function (math in slimtune/ops/rope.py).

One program per (batch, token): it loads that token's cos/sin once and rotates every head of q and of k. The
same kernel runs the backward with ``BACKWARD=True`` (the transpose, a rotation by −θ). Inputs may be strided
views; outputs may alias the inputs (in place). Saved for backward: cos and sin only.
"""

from __future__ import annotations

import torch

from slimtune.ops.dispatch import resolve_backend
from slimtune.ops.rope import rope_ref

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr,
    s_b, s_t, s_h, s_d, o_b, o_t, o_h, o_d,
    b, t, H, HALF,
    c1, c2, s1, s2,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (h < H) & (d < HALF)
    src = in_ptr + b * s_b + t * s_t + h * s_h + d * s_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * s_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    dst = out_ptr + b * o_b + t * o_t + h * o_h + d * o_d
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF * o_d, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr,
    q_sb, q_st, q_sh, q_sd, qo_sb, qo_st, qo_sh, qo_sd,
    k_sb, k_st, k_sh, k_sd, ko_sb, ko_st, ko_sh, ko_sd,
    c_sb, c_st, c_sd,
    T, HQ, HK, HALF,
    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    dmask = d < HALF
    cbase = b * c_sb + t * c_st
    c1 = tl.load(cos_ptr + cbase + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cbase + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cbase + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cbase + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, q_sb, q_st, q_sh, q_sd, qo_sb, qo_st, qo_sh, qo_sd, b, t, HQ, HALF,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, k_sb, k_st, k_sh, k_sd, ko_sb, ko_st, ko_sh, ko_sd, b, t, HK, HALF,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HK, BLOCK_HALF)


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, *, backward: bool,
) -> None:
    """Rotate q (B, T, Hq, D) into q_out and k (B, T, Hk, D) into k_out (outputs may alias inputs).

    cos, sin: (B|1, T, D) — a batch of 1 is broadcast (stride 0)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if B * T == 0:
        return
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = D // 2
    _rope_kernel[(B * T,)](
        q, q_out, k, k_out, cos, sin,
        *q.stride(), *q_out.stride(), *k.stride(), *k_out.stride(),
        c_sb, cos.stride(1), cos.stride(2),
        T, HQ, HK, half,
        BACKWARD=backward,
        BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
        BLOCK_HALF=max(triton.next_power_of_2(half), 2),
        num_warps=4,
    )


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    """(B, T, H, D) as is, (B, T, H*D) viewed as (B, T, H, D)."""
    return t if t.dim() == 4 else t.unflatten(-1, (t.shape[-1] // d, d))


class RoPEFunction(torch.autograd.Function):
    """apply(q, k, cos, sin, head_dim, inplace, backend) -> (q_rot, k_rot). Saves cos and sin only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, head_dim: int, inplace: bool, backend: str | None):
        impl = resolve_backend(q, backend)
        q4, k4 = _heads(q, head_dim), _heads(k, head_dim)
        q_out = q if inplace else torch.empty_like(q)
        k_out = k if inplace else torch.empty_like(k)
        qo4, ko4 = _heads(q_out, head_dim), _heads(k_out, head_dim)
        if impl == "triton":
            rope_triton(q4, k4, qo4, ko4, cos, sin, backward=False)
        else:
            qo4.copy_(rope_ref(q4, cos, sin))
            ko4.copy_(rope_ref(k4, cos, sin))
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.impl, ctx.head_dim = impl, head_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        d = ctx.head_dim
        dq4, dk4 = _heads(dq, d), _heads(dk, d)
        if ctx.impl == "triton":
            dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
            rope_triton(dq4, dk4, _heads(dq_in, d), _heads(dk_in, d), cos, sin, backward=True)
        else:
            dq_in = rope_ref(dq4, cos, sin, backward=True).view(dq.shape)
            dk_in = rope_ref(dk4, cos, sin, backward=True).view(dk.shape)
        return dq_in, dk_in, None, None, None, None, None
