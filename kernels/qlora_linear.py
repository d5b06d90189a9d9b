"""Triton: the base GEMMs of an adapted projection, Y = X Wᵀ + s·L R (+ DoRA scale, + bias), W dequantized in registers.

Layout of this file (kernels -> launchers -> the four Triton primitives):

* `_qlora_gemm_kernel`: out (M, N) = A (M, K) @ Wop (K, N) where Wop[k, n] lives at flat index
  k·stride_wk + n·stride_wn of W (dense pointer or 4-bit NF4/FP4 codes, dequantized tile by tile inside the K loop,
  never written anywhere). Forward uses Wop = Wᵀ (stride_wk = 1, stride_wn = in); dX = dY W uses Wop = W (the
  transposed tile access). The epilogue adds the LoRA term lora_scale · L (M, R) @ Rm (R, N) (R = rank, small),
  then either scales columns (DoRA m/n) + bias + optional accumulate-into-out and stores, or (DMAG) reduces
  Σ_rows dY ⊙ acc into per-column partial sums for the DoRA magnitude gradient.
* the primitives `base_matmul`, `base_matmul_t`, `base_dmag`, `base_row_norm_sq`: same names and signatures as the
  plain-torch ones in slimtune/ops/gemm_torch.py; the one autograd Function (slimtune/ops/lora_linear.py) receives
  them through `slimtune.ops.dispatch.triton_module("qlora_linear")`.

This module imports only torch, triton and slimtune.kernels: `base` is a dense (out, in) tensor or any object with
the fields of `slimtune.ops.nf4.NF4Weight`. Every launch runs under a device guard (the tensor's GPU, not the current
one). Operands are cast to x's dtype for tl.dot (fp32 accumulation); fp32 inputs, and bf16 under the interpreter
(which computes bf16 wrongly), dot in fp32 at `torch.get_float32_matmul_precision()`. Block sizes are launcher
defaults (`DEFAULT_BLOCKS`; tests set smaller ones). Speed: the audit in issue 12 estimates this GEMM 7–12x slower
than dequant + cuBLAS at M = 8192 on an H100 (W is dequantized ceil(M/64) times); it can win only at small M, so
`train.kernels: auto` measures it against the "dequant" backend (slimtune/ops/dispatch.py) before using it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimtune.kernels.nf4 import dequant_4bit, device_guard, nf4_pointer_args

__all__ = [
    "GemmBlocks",
    "DEFAULT_BLOCKS",
    "base_matmul",
    "base_matmul_t",
    "base_dmag",
    "base_row_norm_sq",
]


@dataclass(frozen=True)
class GemmBlocks:
    """Tile sizes of the GEMM kernels (upper bounds: a launch shrinks them to the problem, 16 at least)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8  # tiles of M walked together so W tiles are reused from L2
    num_warps: int = 4
    # 2 stages: the 4-bit kernel AOT-compiled (triton 3.9, sm_80/89/90, 64x64x64) needs 64 KiB of shared memory;
    # 3 stages need 112 KiB, more than sm_86/sm_89 (RTX 30xx/40xx) allow per block. Speed: untuned (no GPU).
    num_stages: int = 2


DEFAULT_BLOCKS = GemmBlocks()
Base = torch.Tensor  # or an NF4Weight (slimtune.ops.nf4; duck-typed here: kernels do not import slimtune.ops)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _qlora_gemm_kernel(
    a_ptr,  # (M, K): X in the forward, dY for dX
    w_ptr,  # dense W, or the packed 4-bit codes
    code_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    kscale_ptr,  # (K,) scale on A's columns (DoRA m/n on dY for dX)
    l_ptr,  # (M, R) LoRA left factor
    r_ptr,  # (R, N) LoRA right factor
    colscale_ptr,  # (N,) DoRA m/n on the output
    bias_ptr,  # (N,)
    dy_ptr,  # (M, N) upstream gradient (DMAG only)
    out_ptr,  # (M, N), or (cdiv(M, BLOCK_M), N) fp32 partial sums when DMAG
    M,
    N,
    K,
    R,
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    stride_dym,
    stride_dyn,
    stride_om,
    stride_on,
    lora_scale,
    W_4BIT: tl.constexpr,
    NESTED: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr,
    A_KSCALE: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_COLSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DMAG: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot: x's dtype, or fp32 (fp32 inputs; bf16 in the interpreter)
    DOT_PRECISION: tl.constexpr,  # fp32 dots: "tf32" or "ieee", following torch.backends.cuda.matmul.allow_tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share each column-tile of W while it is hot in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    absmax_offset = 0.0
    if W_4BIT:
        if NESTED:
            absmax_offset = tl.load(absmax_offset_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        offs_k64 = offs_k.to(tl.int64)
        a = tl.load(
            a_ptr + offs_m64[:, None] * stride_am + offs_k64[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if A_KSCALE:
            a = a.to(tl.float32) * tl.load(kscale_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        w_idx = offs_k64[:, None] * stride_wk + offs_n64[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if W_4BIT:
            w = dequant_4bit(
                w_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, w_idx, w_mask,
                QBLOCK, NESTED, QBLOCK2,
            )
        else:
            w = tl.load(w_ptr + w_idx, mask=w_mask, other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)

    if HAS_LORA:  # epilogue: + s · L R, with the rank R streamed in BLOCK_R chunks
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            lt = tl.load(
                l_ptr + offs_m64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            rt = tl.load(
                r_ptr + offs_r[:, None] * stride_rr + offs_n64[None, :] * stride_rn,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            lora += tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        acc += lora_scale * lora

    if DMAG:  # Σ_rows dY ⊙ (X Wᵀ + s L R) for this row-tile
        dy = tl.load(
            dy_ptr + offs_m64[:, None] * stride_dym + offs_n64[None, :] * stride_dyn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        part = tl.sum(dy * acc, axis=0)
        tl.store(out_ptr + pid_m * stride_om + offs_n64 * stride_on, part, mask=n_mask)
    else:
        if HAS_COLSCALE:
            acc = acc * tl.load(colscale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n64[None, :] * stride_on
        o_mask = m_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _row_norm_sq_kernel(
    w_ptr,
    code_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    out_ptr,  # (N,) fp32
    N,
    K,
    stride_wn,
    stride_wk,
    W_4BIT: tl.constexpr,
    NESTED: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    absmax_offset = 0.0
    if W_4BIT:
        if NESTED:
            absmax_offset = tl.load(absmax_offset_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = offs_n64[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        if W_4BIT:
            w = dequant_4bit(
                w_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, idx, mask, QBLOCK,
                NESTED, QBLOCK2,
            )
        else:
            w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * w, axis=1)
    tl.store(out_ptr + offs_n, acc, mask=n_mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers: the Triton primitives (same names/signatures as slimtune/ops/gemm_torch.py)
# ----------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not _interpreting():  # the interpreter computes bf16 dots wrongly
        return tl.bfloat16
    return tl.float32


def _dot_precision() -> str:
    """fp32 dots follow torch's CUDA matmul setting (exact fp32 by default; tf32 costs ~3e-4 relative).

    Once the newer API (torch >= 2.9: `torch.backends[.cuda.matmul].fp32_precision`) has set it, both legacy reads,
    `torch.backends.cuda.matmul.allow_tf32` and `torch.get_float32_matmul_precision()`, raise (torch 2.13, checked
    in tests/kernels/test_qlora_linear.py); `fp32_precision` itself reads fine whichever API was used.
    """
    p = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if p in ("ieee", "tf32"):
        return p
    try:  # torch < 2.9, or "none" (inherited and never set): the legacy query is consistent then
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:
        return "ieee"


def _block(limit: int, size: int) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(int(size), 1))))


def _w_args(base, dx: bool):
    """(pointer args, stride_wk, stride_wn, (W_4BIT, NESTED, QBLOCK, QBLOCK2)) for Wop = Wᵀ (forward) or W (dx)."""
    if not isinstance(base, torch.Tensor):  # 4-bit: an NF4Weight (duck-typed)
        s_out, s_in = base.in_features, 1  # flat index o*in + i
        ptrs = nf4_pointer_args(base)
        meta = (True, base.nested, base.blocksize, base.absmax_blocksize)
    else:
        s_out, s_in = base.stride(0), base.stride(1)
        ptrs = (base,) * 6
        meta = (False, False, 64, 256)
    # forward: Wop[k=i, n=o] = W[o, i];  backward: Wop[k=o, n=i] = W[o, i]
    stride_wk, stride_wn = (s_out, s_in) if dx else (s_in, s_out)
    return ptrs, stride_wk, stride_wn, meta


def _launch_gemm(
    a: torch.Tensor,
    base: Base,
    *,
    dx: bool,
    out: torch.Tensor,
    n: int,
    kscale: torch.Tensor | None = None,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    colscale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    accumulate: bool = False,
    dmag_dy: torch.Tensor | None = None,
    blocks: GemmBlocks | None = None,
) -> None:
    cfg = blocks or DEFAULT_BLOCKS
    m, k = a.shape
    if m == 0 or n == 0:
        return
    bm, bn, bk = _block(cfg.block_m, m), _block(cfg.block_n, n), _block(cfg.block_k, k)
    ptrs, stride_wk, stride_wn, (w4, nested, qblock, qblock2) = _w_args(base, dx)
    has_lora = lora_left is not None and lora_left.shape[1] > 0
    r = lora_left.shape[1] if has_lora else 0
    # placeholder for unused pointers: a read-only input (never `out`: the interpreter copies every argument back,
    # so an aliased output would be overwritten by a stale copy)
    dummy = a
    left = lora_left if has_lora else dummy
    right = lora_right if has_lora else dummy
    dy = dmag_dy if dmag_dy is not None else dummy
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    with device_guard(a):
        _qlora_gemm_kernel[grid](
            a, *ptrs,
            kscale if kscale is not None else dummy,
            left, right,
            colscale if colscale is not None else dummy,
            bias if bias is not None else dummy,
            dy, out,
            m, n, k, r,
            a.stride(0), a.stride(1), stride_wk, stride_wn,
            left.stride(0) if has_lora else 0, left.stride(1) if has_lora else 0,
            right.stride(0) if has_lora else 0, right.stride(1) if has_lora else 0,
            dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
            float(lora_scale),
            W_4BIT=w4, NESTED=nested, QBLOCK=qblock, QBLOCK2=qblock2,
            A_KSCALE=kscale is not None, HAS_LORA=has_lora, HAS_COLSCALE=colscale is not None,
            HAS_BIAS=bias is not None, ACCUMULATE=accumulate, DMAG=dmag_dy is not None,
            DOT_DTYPE=_dot_dtype(a.dtype), DOT_PRECISION=_dot_precision(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_block(64, r), GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


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
    """(x Wᵀ + lora_scale · lora_left @ lora_right) · out_scale + bias, one kernel. x (T, in) -> (T, out)."""
    n_out = base.shape[0]
    if out is None:
        out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    _launch_gemm(
        x, base, dx=False, out=out, n=n_out, lora_left=lora_left, lora_right=lora_right,
        lora_scale=lora_scale, colscale=_fp32(out_scale), bias=None if bias is None else bias.contiguous(),
    )
    return out


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
    """(dy · out_scale) @ W + lora_left @ lora_right (+ out when accumulate), one kernel. dy (T, out) -> (T, in)."""
    n_in = base.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("base_matmul_t: accumulate=True needs out")
        out = torch.empty((dy.shape[0], n_in), dtype=dy.dtype, device=dy.device)
    _launch_gemm(
        dy, base, dx=True, out=out, n=n_in, kscale=_fp32(out_scale), lora_left=lora_left,
        lora_right=lora_right, accumulate=accumulate,
    )
    return out


def base_dmag(
    x: torch.Tensor,
    dy: torch.Tensor,
    base: Base,
    *,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Σ_t dy ⊙ (x Wᵀ + lora_scale · lora_left @ lora_right), fp32 (out,); z is recomputed tile by tile."""
    cfg = DEFAULT_BLOCKS
    n_out = base.shape[0]
    bm = _block(cfg.block_m, x.shape[0])
    partial = torch.empty((triton.cdiv(x.shape[0], bm), n_out), dtype=torch.float32, device=x.device)
    _launch_gemm(
        x, base, dx=False, out=partial, n=n_out, lora_left=lora_left, lora_right=lora_right,
        lora_scale=lora_scale, dmag_dy=dy,
    )
    return partial.sum(0)  # deterministic (no atomics)


NORM_BLOCK_N, NORM_BLOCK_K = 16, 128  # rows x columns per program of _row_norm_sq_kernel (untuned: no GPU)


def base_row_norm_sq(base: Base) -> torch.Tensor:
    """‖W_o‖² per output row, fp32 (out,), from the 4-bit codes directly."""
    n_out, n_in = base.shape
    device = base.packed.device if not isinstance(base, torch.Tensor) else base.device
    out = torch.empty(n_out, dtype=torch.float32, device=device)
    ptrs, stride_wk, stride_wn, (w4, nested, qblock, qblock2) = _w_args(base, dx=False)
    # rows are the n axis here: stride of o is stride_wn, stride of i is stride_wk
    bn, bk = NORM_BLOCK_N, _block(NORM_BLOCK_K, n_in)
    if n_out:
        with device_guard(out):
            _row_norm_sq_kernel[(triton.cdiv(n_out, bn),)](
                *ptrs, out, n_out, n_in, stride_wn, stride_wk, W_4BIT=w4, NESTED=nested, QBLOCK=qblock,
                QBLOCK2=qblock2, BLOCK_N=bn, BLOCK_K=bk,
            )
    return out


