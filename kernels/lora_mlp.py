"""Triton + autograd.Function: the LoRA SwiGLU MLP out = down(silu(gate(X)) ⊙ up(X)).

The three projections run through the QLoRA GEMM of qlora_linear.py (W dequantized in registers, LoRA term in the
epilogue); this file adds the SwiGLU elementwise kernels and the Function that ties them together.

Saved for backward: X (only when a gate/up adapter needs dA or dm), e = gate(X), g = up(X), each adapter's (T, r)
X Aᵀ / h Aᵀ and DoRA norms (out,). Backward recomputes h = silu(e) ⊙ g into one new (T, I) buffer, writes dh into
that same buffer once h is dead, then de and dg into e's and g's storage (and dX into X's when asked): the only
(T, I) allocation in backward is h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.qlora_linear import (
    backend_ops,
    dropout_seed,
    factor_needs,
    projection_backward,
    projection_forward,
    projection_grad_input,
    saved_for,
)
from slimtune.ops.lora_linear import LoRAProjection
from slimtune.ops.lora_mlp import swiglu as torch_swiglu
from slimtune.ops.lora_mlp import swiglu_backward_ as torch_swiglu_backward_

__all__ = ["swiglu", "swiglu_backward_", "LoRAMLPFunction", "lora_mlp_fused"]

ELEMENTWISE_BLOCK = 1024  # (untuned: no GPU)


@triton.jit
def _swiglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = e * tl.sigmoid(e) * g
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, e_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """In place: e <- dh·g·silu'(e), g <- dh·silu(e)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(e)
    dg = dh * e * sig
    de = dh * g * sig * (1.0 + e * (1.0 - sig))
    tl.store(e_ptr + offs, de.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offs, dg.to(g_ptr.dtype.element_ty), mask=mask)


def swiglu(e: torch.Tensor, g: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(e) ⊙ g (contiguous e, g of one shape)."""
    if out is None:
        out = torch.empty_like(e)
    n = e.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](e, g, out, n, BLOCK=ELEMENTWISE_BLOCK)
    return out


def swiglu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> None:
    """In place: e <- de, g <- dg."""
    n = e.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](dh, e, g, n, BLOCK=ELEMENTWISE_BLOCK)


def _swiglu_ops(backend: str):
    if backend == "triton":
        return swiglu, swiglu_backward_
    return torch_swiglu, torch_swiglu_backward_


class LoRAMLPFunction(torch.autograd.Function):
    """out = down(silu(gate(x)) ⊙ up(x)) for x (T, hidden).

    Inputs after (x, projs, backend, inplace_input_grad) are the factors of gate, up, down, five each in
    `LoRAProjection.factors()` order (A, B, M, mag, bias).
    """

    @staticmethod
    def forward(ctx, x, projs: tuple, backend: str, inplace_input_grad: bool, *factors):
        ops = backend_ops(backend)
        act, _ = _swiglu_ops(backend)
        p_gate, p_up, p_down = projs
        f_gate, f_up, f_down = factors[0:5], factors[5:10], factors[10:15]
        seeds = tuple(dropout_seed(p) for p in projs)  # LoRA dropout: independent masks per projection
        e, xa_g, n_g = projection_forward(ops, x, p_gate, f_gate, seed=seeds[0])
        g, xa_u, n_u = projection_forward(ops, x, p_up, f_up, seed=seeds[1])
        h = act(e, g)
        y, xa_d, n_d = projection_forward(ops, h, p_down, f_down, seed=seeds[2])
        del h  # recomputed in backward

        per_proj = factors_of(factors)
        needs = [factor_needs(f, ctx.needs_input_grad[4 + 5 * i : 9 + 5 * i]) for i, f in enumerate(per_proj)]
        keep = [saved_for(f, nd) for f, nd in zip(per_proj, needs, strict=True)]
        keep_x = keep[0][0] or keep[1][0]
        ctx.projs, ctx.backend, ctx.needs, ctx.seeds = projs, backend, needs, seeds
        ctx.recompute_h = keep[2][0]  # down needs h for dA / dm
        # dX may go into X's storage only when that storage belongs to no leaf (a parameter or a user's input)
        root = x._base if x._base is not None else x
        ctx.inplace_input_grad = bool(inplace_input_grad) and keep_x and not root.is_leaf
        xas = [xa if k[1] else None for xa, k in zip((xa_g, xa_u, xa_d), keep, strict=True)]
        ctx.save_for_backward(x if keep_x else None, e, g, *xas, n_g, n_u, n_d, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, e, g, xa_g, xa_u, xa_d, n_g, n_u, n_d, *factors = ctx.saved_tensors
        ops = backend_ops(ctx.backend)
        act, act_backward_ = _swiglu_ops(ctx.backend)
        p_gate, p_up, p_down = ctx.projs
        f_gate, f_up, f_down = factors_of(tuple(factors))
        need_gate, need_up, need_down = ctx.needs
        s_gate, s_up, s_down = ctx.seeds
        need_x = ctx.needs_input_grad[0]
        need_dh = need_x or any(need_gate) or any(need_up)
        dy = dy.contiguous()

        h = act(e, g) if ctx.recompute_h else None  # the one (T, I) allocation
        grads_down, gm_d = projection_backward(
            ops, dy, h, p_down, f_down, xa_d, n_d, needs=(need_dh, *need_down), seed=s_down
        )
        grads_gate = grads_up = (None,) * 5
        dx = None
        if need_dh:
            dh = projection_grad_input(ops, dy, p_down, f_down, n_d, gm_d, out=h, seed=s_down)  # h is dead: reuse
            act_backward_(dh, e, g)  # e <- de, g <- dg
            de, dg = e, g
            del dh, h
            grads_gate, gm_g = projection_backward(
                ops, de, x, p_gate, f_gate, xa_g, n_g, needs=(need_x, *need_gate), seed=s_gate
            )
            grads_up, gm_u = projection_backward(ops, dg, x, p_up, f_up, xa_u, n_u, needs=(need_x, *need_up), seed=s_up)
            if need_x:  # x has been read for the last time
                dx = projection_grad_input(
                    ops, de, p_gate, f_gate, n_g, gm_g, out=x if ctx.inplace_input_grad else None, seed=s_gate
                )
                projection_grad_input(ops, dg, p_up, f_up, n_u, gm_u, out=dx, accumulate=True, seed=s_up)
        return (dx, None, None, None, *grads_gate, *grads_up, *grads_down)


def factors_of(factors: tuple) -> tuple[tuple, tuple, tuple]:
    return factors[0:5], factors[5:10], factors[10:15]


def lora_mlp_fused(
    x: torch.Tensor,
    *,
    gate: LoRAProjection,
    up: LoRAProjection,
    down: LoRAProjection,
    backend: str = "triton",
    inplace_input_grad: bool = False,
) -> torch.Tensor:
    """The fused MLP for a 2-D x (T, hidden) on the given backend ("triton" | "torch")."""
    if x.dim() != 2:
        raise ValueError(f"lora_mlp expects a 2-D (tokens, hidden) input, got shape {tuple(x.shape)}")
    if gate.shape != up.shape or down.shape[1] != gate.shape[0] or x.shape[1] != gate.shape[1]:
        raise ValueError(
            f"lora_mlp: shapes do not chain: x {tuple(x.shape)}, gate {gate.shape}, up {up.shape}, down {down.shape}"
        )
    return LoRAMLPFunction.apply(
        x, (gate, up, down), backend, inplace_input_grad, *gate.factors(), *up.factors(), *down.factors()
    )
