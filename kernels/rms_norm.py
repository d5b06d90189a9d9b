"""RMSNorm: Triton kernels, launchers and the autograd Function.

Forward, one program per row: load x (fp32 math), rstd = 1/sqrt(mean(x²)+eps), y = x·rstd·w; store y and rstd.
Backward, each program walks a contiguous run of rows: dx = rstd·(w·dy − x̂·mean(w·dy·x̂)) with x̂ = x·rstd,
and a per-program partial Σ dy·x̂ for dw (summed by torch afterwards) only when the weight trains.

Saved for backward: rstd (n fp32 values) and x — or the output y when ``save_output`` (x̂ = y / w then), on both
backends.
"""

from __future__ import annotations

import torch

from slimtune.ops.dispatch import resolve_backend
from slimtune.ops.rms_norm import rms_norm_backward_ref, rms_norm_forward_ref

import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    stride_x, stride_y,
    N, eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(ms + eps)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    stride_dy, stride_x, stride_dx,
    n_rows, N, rows_per_prog,
    NEED_DW: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        n_valid = tl.where(row < n_rows, N, 0)  # a whole row, or nothing past the last row
        mask = cols < n_valid
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        if FROM_OUTPUT:  # x holds y = x̂·w
            xhat = tl.where(w != 0.0, x / tl.where(w != 0.0, w, 1.0), 0.0)
        else:
            xhat = x * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / N
        dx = rstd * (g - xhat * c)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
    if NEED_DW:
        tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=cmask)


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, N) with unit column stride, weight (N,) -> y (n, N), rstd (n,) fp32."""
    n, N = x.shape
    y = torch.empty((n, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, rstd
    block = _block_n(N)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_fwd_kernel[(n,)](
        x, weight, y, rstd, x.stride(0), y.stride(0), N, eps, BLOCK_N=block, num_warps=num_warps
    )
    return y, rstd


def rms_norm_backward_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    *,
    need_dw: bool,
    from_output: bool = False,
    dx_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as slimtune.ops.rms_norm.rms_norm_backward_ref."""
    n, N = x.shape
    dx = torch.empty((n, N), dtype=dx_dtype or x.dtype, device=x.device)
    if n == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    if x.is_cuda:
        n_prog = min(n, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        n_prog = min(n, 8)  # the interpreter: few programs, each a loop over rows
    rows_per_prog = triton.cdiv(n, n_prog)
    n_prog = triton.cdiv(n, rows_per_prog)
    dw_part = torch.empty((n_prog, N), dtype=torch.float32, device=x.device) if need_dw else rstd
    block = _block_n(N)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_bwd_kernel[(n_prog,)](
        dy, x, weight, rstd, dx, dw_part,
        dy.stride(0), x.stride(0), dx.stride(0),
        n, N, rows_per_prog,
        NEED_DW=need_dw, FROM_OUTPUT=from_output, BLOCK_N=block, num_warps=num_warps,
    )
    dw = dw_part.sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (n, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """apply(x, weight, eps, save_output, backend) -> y. Saves rstd (n,) and x, or y when ``save_output``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, save_output: bool, backend: str | None):
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
        x2 = _rows(x)
        impl = resolve_backend(x, backend)
        if impl == "triton":
            y, rstd = rms_norm_forward_triton(x2, weight, eps)
        else:
            y, rstd = rms_norm_forward_ref(x2, weight, eps)
        y = y.view(x.shape)
        ctx.save_for_backward(y if save_output else x2, weight, rstd)
        ctx.impl, ctx.save_output, ctx.x_dtype = impl, save_output, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dy2 = _rows(dy)
        kw = dict(need_dw=need_dw, from_output=ctx.save_output, dx_dtype=ctx.x_dtype)
        if ctx.impl == "triton":
            dx, dw = rms_norm_backward_triton(dy2, _rows(saved), weight, rstd, **kw)
        else:
            dx, dw = rms_norm_backward_ref(dy2, _rows(saved), weight, rstd, **kw)
        return dx.view(dy.shape), dw, None, None, None
