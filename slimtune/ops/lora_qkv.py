"""Attention input projections q, k, v as one fused op that saves X once (o goes through `lora_linear`).

Each projection is a `LoRAProjection` (frozen NF4 or dense base, optional bias, optional adapter: any of q/k/v may
have none, e.g. PEFT's default q,v targets). The Function runs the projection math of slimtune/ops/lora_linear.py
on the chosen backend's primitives (torch, dequant or triton). Saved for backward: X (only when some adapter needs
dA or dm), each adapter's (T, r) X Aᵀ and DoRA norm (out,). Backward accumulates the three dX GEMMs into one buffer.
"""

from __future__ import annotations

import torch

from slimtune.ops.autotune import autograd_trial
from slimtune.ops.dispatch import GEMM_BACKENDS, resolve_backend
from slimtune.ops.lora_linear import (
    LoRAProjection,
    backend_ops,
    dropout_seed,
    _with,
    factor_needs,
    gemm_shape_class,
    lora_linear_reference,
    projection_backward,
    projection_forward,
    projection_grad_input,
    saved_for,
)

__all__ = ["LoRAQKVFunction", "lora_qkv", "lora_qkv_fused", "lora_qkv_reference"]


class LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = (proj_q(x), proj_k(x), proj_v(x)) for x (T, hidden).

    Inputs after (x, projs, backend) are the factors of q, k, v, five each in `LoRAProjection.factors()` order.
    """

    @staticmethod
    def forward(ctx, x, projs: tuple, backend: str, *factors):
        ops = backend_ops(backend)
        per_proj = (factors[0:5], factors[5:10], factors[10:15])
        outs, xas, norms, needs, keep_x = [], [], [], [], False
        seeds = tuple(dropout_seed(p) for p in projs)  # LoRA dropout: independent masks per projection
        for i, (proj, f) in enumerate(zip(projs, per_proj, strict=True)):
            y, xa, norm = projection_forward(ops, x, proj, f, seed=seeds[i])
            nd = factor_needs(f, ctx.needs_input_grad[3 + 5 * i : 8 + 5 * i])
            kx, kxa = saved_for(f, nd)
            keep_x = keep_x or kx
            outs.append(y)
            xas.append(xa if kxa else None)
            norms.append(norm)
            needs.append(nd)
        ctx.projs, ctx.backend, ctx.needs, ctx.seeds = projs, backend, needs, seeds
        ctx.save_for_backward(x if keep_x else None, *xas, *norms, *factors)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, *rest = ctx.saved_tensors
        xas, norms, factors = rest[0:3], rest[3:6], rest[6:]
        ops = backend_ops(ctx.backend)
        need_x = ctx.needs_input_grad[0]
        grads, gms, dys = [], [], []
        for i, dy in enumerate((dq, dk, dv)):
            dy = dy.contiguous()
            f = tuple(factors[5 * i : 5 * i + 5])
            g, gm = projection_backward(
                ops, dy, x, ctx.projs[i], f, xas[i], norms[i], needs=(need_x, *ctx.needs[i]), seed=ctx.seeds[i]
            )
            grads.extend(g)
            gms.append(gm)
            dys.append(dy)
        dx = None
        if need_x:
            for i in range(3):
                f = tuple(factors[5 * i : 5 * i + 5])
                dx = projection_grad_input(
                    ops, dys[i], ctx.projs[i], f, norms[i], gms[i], out=dx, accumulate=dx is not None,
                    seed=ctx.seeds[i],
                )
        return (dx, None, None, *grads)


def lora_qkv_fused(
    x: torch.Tensor, *, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused q/k/v projections for a 2-D x (T, hidden) on the given backend ("torch" | "dequant" | "triton")."""
    if x.dim() != 2:
        raise ValueError(f"lora_qkv expects a 2-D (tokens, hidden) input, got shape {tuple(x.shape)}")
    for name, p in (("q", q), ("k", k), ("v", v)):
        if p.shape[1] != x.shape[1]:
            raise ValueError(f"lora_qkv: {name} expects {p.shape[1]} input features, x has {x.shape[1]}")
    return LoRAQKVFunction.apply(x, (q, k, v), backend, *q.factors(), *k.factors(), *v.factors())


def lora_qkv(
    x: torch.Tensor,
    *,
    q: LoRAProjection,
    k: LoRAProjection,
    v: LoRAProjection,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q(x), k(x), v(x)) for x (..., hidden); X is saved once (and only if an adapter needs dA or dm)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])

    def fn(b, x, *f):
        return lora_qkv_fused(x, q=_with(q, f[0:5]), k=_with(k, f[5:10]), v=_with(v, f[10:15]), backend=b)

    b = resolve_backend(
        x, backend, op="lora_qkv", shape_class=gemm_shape_class(x2, (q, k, v)), choices=GEMM_BACKENDS,
        trial=autograd_trial(fn, (x2, *q.factors(), *k.factors(), *v.factors()), rows=1),
    )
    outs = lora_qkv_fused(x2, q=q, k=k, v=v, backend=b)
    return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)


def lora_qkv_reference(
    x: torch.Tensor, *, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula in plain autograd (materialises W; everything in `dtype`, default x.dtype)."""
    return tuple(lora_linear_reference(x, p, dtype=dtype) for p in (q, k, v))
