"""Chunked linear cross-entropy: Triton row kernel, launcher and the autograd Function.

The GEMMs (x_c Wᵀ, dlogits W, dlogitsᵀ x_c) are torch matmuls (cuBLAS) on both backends; the backend chooses who
does the per-row work on a chunk of logits: an online logsumexp over the vocabulary, the row loss, and — when a
gradient is wanted — the overwrite of the logits buffer by softmax − onehot. See slimtune/ops/linear_ce.py for
the math and what is saved (dx, and dW only when the head trains).
"""

from __future__ import annotations

import torch

from slimtune.ops.dispatch import resolve_backend
from slimtune.ops.linear_ce import ce_rows_ref

import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(
    logits_ptr, targets_ptr, loss_ptr,
    stride_row, V, ignore_index,
    GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    t = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # pass 1: online max / sum of exponentials over the vocabulary
    m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    for off in range(0, V, BLOCK_V):
        z = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    t_safe = tl.where(valid, t, 0)
    z_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    if GRAD:
        # pass 2: dlogits = softmax - onehot, written over the logits (zeros on ignored rows)
        keep = tl.where(valid, 1.0, 0.0)
        for off in range(0, V, BLOCK_V):
            c = off + cols
            cmask = c < V
            z = tl.load(base + c, mask=cmask, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(c == t, 1.0, 0.0)) * keep
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=cmask)


def ce_rows_triton(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, grad: bool) -> torch.Tensor:
    """Same contract as slimtune.ops.linear_ce.ce_rows_ref: per-row loss (c,) fp32, dlogits in place if grad."""
    c, V = logits.shape
    loss = torch.empty((c,), dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    block = min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 1024)
    _ce_rows_kernel[(c,)](
        logits, targets, loss, logits.stride(0), V, ignore_index,
        GRAD=grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(x (T,H), weight (V,H), bias|None, targets (T,), normalizer|None, ignore_index, reduction, chunk_size,
    compute_grad, backend) -> loss (0-dim fp32). Saves dx (T,H), and dW / db only when those train."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, normalizer, ignore_index, reduction, chunk_size, compute_grad, backend):
        impl = resolve_backend(x, backend)
        rows = ce_rows_triton if impl == "triton" else ce_rows_ref
        T, H = x.shape
        need_dx = compute_grad and ctx.needs_input_grad[0]
        need_dw = compute_grad and ctx.needs_input_grad[1]
        need_db = compute_grad and bias is not None and ctx.needs_input_grad[2]
        grad = need_dx or need_dw or need_db
        w = weight
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64, for tests)
        loss_rows = torch.empty((T,), dtype=acc, device=x.device)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=acc, device=w.device) if need_db else None
        for s in range(0, T, chunk_size):
            e = min(T, s + chunk_size)
            xc = x[s:e].to(w.dtype)  # (c, H)
            logits = torch.nn.functional.linear(xc, w, bias)  # (c, V), the only logits that exist
            loss_rows[s:e] = rows(logits, targets[s:e], ignore_index=ignore_index, grad=grad)
            if need_dx:
                torch.matmul(logits, w, out=dx[s:e]) if dx.dtype == w.dtype else dx[s:e].copy_(logits @ w)
            if need_dw:
                dw.addmm_(logits.t().to(acc), xc.to(acc))
            if need_db:
                db += logits.to(acc).sum(dim=0)
            del logits
        total = loss_rows.sum()
        if reduction == "mean":
            factor = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(acc)
        elif normalizer is not None:
            factor = 1.0 / normalizer.to(device=x.device, dtype=acc)
        else:
            factor = torch.ones((), dtype=acc, device=x.device)
        ctx.save_for_backward(dx, dw, db, factor)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * factor

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db, factor = ctx.saved_tensors
        g = (grad_loss.to(factor.dtype) * factor).reshape(())
        x_dt, w_dt, b_dt = ctx.dtypes
        gx = (dx * g.to(dx.dtype)) if dx is not None else None
        gw = (dw * g).to(w_dt) if dw is not None else None
        gb = (db * g).to(b_dt) if db is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None
