"""RMSNorm: Triton kernels, their launchers and the Triton primitives of ``slimtune.ops.rms_norm``.

Forward, one program per row: load x (fp32 math), rstd = 1/sqrt(mean(x²)+eps), y = x·rstd·(offset + w); store y
and rstd. Backward, each program walks a contiguous run of rows: dx = rstd·(w'·dy − x̂·mean(w'·dy·x̂)) with
x̂ = x·rstd and w' = offset + w, and a per-program partial Σ dy·x̂ for dw (summed by torch afterwards) only when the
weight trains. ``offset`` is 0 for Llama-style norms and 1 for Gemma's (1 + w). With ``from_output`` the x argument
holds y and x̂ = y / w'.

The autograd Function and the readable reference live in slimtune/ops/rms_norm.py; this module imports
only torch, triton and slimtune.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.nf4 import device_guard

__all__ = ["rms_norm_forward_triton", "rms_norm_backward_triton", "COMPILE_VARIANTS"]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    stride_x, stride_y,
    N, eps, offset,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    ms = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(ms + eps)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    stride_dy, stride_x, stride_dx,
    n_rows, N, rows_per_prog, offset,
    NEED_DW: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + offset  # w' = offset + w
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        n_valid = tl.where(row < n_rows, N, 0)  # a whole row, or nothing past the last row
        mask = cols < n_valid
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        if FROM_OUTPUT:  # x holds y = x̂·w'
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


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    """promote(x, w) for Llama-style norms (HF: w * x̂.to(x.dtype)); x's dtype with an offset (HF Gemma: cast last)."""
    return x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)


def rms_norm_forward_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as slimtune.ops.rms_norm.rms_norm_forward_ref: x (n, N) with unit column stride, weight (N,)
    -> y (n, N), rstd (n,) fp32."""
    n, N = x.shape
    y = torch.empty((n, N), dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, rstd
    block = _block_n(N)
    with device_guard(x):
        _rms_norm_fwd_kernel[(n,)](
            x, weight, y, rstd, x.stride(0), y.stride(0), N, eps, float(offset), BLOCK_N=block,
            num_warps=_num_warps(block),
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
    offset: float = 0.0,
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
    with device_guard(x):
        _rms_norm_bwd_kernel[(n_prog,)](
            dy, x, weight, rstd, dx, dw_part,
            dy.stride(0), x.stride(0), dx.stride(0),
            n, N, rows_per_prog, float(offset),
            NEED_DW=need_dw, FROM_OUTPUT=from_output, BLOCK_N=block, num_warps=_num_warps(block),
        )
    dw = dw_part.sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# the launches a training run makes, for the AOT compile matrix (tests/kernels/test_compile_matrix.py): dicts with
# name, kernel (attribute name), signature (runtime args), constexprs, num_warps, num_stages
# ----------------------------------------------------------------------------------------------------------------


def _variant(name: str, fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int) -> dict:
    return {"name": name, "kernel": fn.__name__, "signature": types, "constexprs": constexprs,
            "num_warps": num_warps, "num_stages": 2}


def _compile_variants() -> list[dict]:
    out = []
    # hidden sizes: Llama-3.1-8B 4096, Qwen2.5-3B 2048, Gemma-2-9B 3584, Gemma-3-4B 2560; 128 / 256: q/k norms
    for n in (4096, 2048, 3584, 2560, 128, 256):
        block = _block_n(n)
        for act, w in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16")):
            fwd = dict(x_ptr=f"*{act}", w_ptr=f"*{w}", y_ptr=f"*{act if w != 'fp32' else 'fp32'}", rstd_ptr="*fp32",
                       stride_x="i32", stride_y="i32", N="i32", eps="fp32", offset="fp32")
            tag = f"N={n},{act}/{w}"
            nw = _num_warps(block)
            out.append(_variant(f"rms_norm_fwd[{tag}]", _rms_norm_fwd_kernel, fwd, {"BLOCK_N": block}, nw))
            bwd = dict(dy_ptr=f"*{act}", x_ptr=f"*{act}", w_ptr=f"*{w}", rstd_ptr="*fp32", dx_ptr=f"*{act}",
                       dw_part_ptr="*fp32", stride_dy="i32", stride_x="i32", stride_dx="i32", n_rows="i32", N="i32",
                       rows_per_prog="i32", offset="fp32")
            for need_dw in (False, True):
                for from_output in (False, True):
                    cx = {"NEED_DW": need_dw, "FROM_OUTPUT": from_output, "BLOCK_N": block}
                    name = f"rms_norm_bwd[{tag},dw={int(need_dw)},from_y={int(from_output)}]"
                    out.append(_variant(name, _rms_norm_bwd_kernel, bwd, cx, _num_warps(block)))
    return out


COMPILE_VARIANTS: list[dict] = _compile_variants()
