"""Triton: the QLoRA linear Y = X Wᵀ + s·(X Aᵀ Mᵀ) Bᵀ (+ DoRA scale, + bias) with W dequantized in registers.

Layout of this file (kernel -> launchers -> projection forward/backward -> autograd.Function):

* `_qlora_gemm_kernel`: out (M, N) = A (M, K) @ Wop (K, N) where Wop[k, n] lives at flat index
  k·stride_wk + n·stride_wn of W (dense pointer or 4-bit NF4/FP4 codes, dequantized tile by tile inside the K loop,
  never written anywhere). Forward uses Wop = Wᵀ (stride_wk = 1, stride_wn = in); dX = dY W uses Wop = W (the
  transposed tile access). The epilogue adds the LoRA term lora_scale · L (M, R) @ Rm (R, N) (R = rank, small),
  then either scales columns (DoRA m/n) + bias + optional accumulate-into-out and stores, or (DMAG) reduces
  Σ_rows dY ⊙ acc into per-column partial sums for the DoRA magnitude gradient.
* launchers `base_matmul`, `base_matmul_t`, `base_dmag`, `base_row_norm_sq`: same names and signatures as the
  plain-torch pieces in slimtune/ops/lora_linear.py.
* `projection_forward` / `projection_backward` / `projection_grad_input`: the math of one adapted projection on
  either backend (LoRA dropout by a seed whose mask is regenerated in backward); the fused MLP (lora_mlp.py) and
  q/k/v (lora_qkv.py) Functions are built from them.
* `QLoRALinearFunction` + `qlora_linear(x, *, proj, backend)`.

Operands are cast to x's dtype for tl.dot (fp32 accumulation); fp32 inputs, and bf16 under the interpreter (which
computes bf16 wrongly), dot in fp32. Block sizes are launcher defaults (`DEFAULT_BLOCKS`; tests set smaller ones).
Speed: untuned (no GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from slimtune.kernels.nf4 import dequant_4bit, nf4_pointer_args
from slimtune.ops.lora_linear import LoRAProjection, dropout_mask
from slimtune.ops.lora_linear import base_dmag as torch_base_dmag
from slimtune.ops.lora_linear import base_matmul as torch_base_matmul
from slimtune.ops.lora_linear import base_matmul_t as torch_base_matmul_t
from slimtune.ops.lora_linear import base_row_norm_sq as torch_base_row_norm_sq
from slimtune.ops.nf4 import NF4Weight

__all__ = [
    "GemmBlocks",
    "DEFAULT_BLOCKS",
    "base_matmul",
    "base_matmul_t",
    "base_dmag",
    "base_row_norm_sq",
    "backend_ops",
    "dropout_seed",
    "projection_forward",
    "projection_backward",
    "projection_grad_input",
    "QLoRALinearFunction",
    "qlora_linear",
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
# launchers (same names/signatures as the torch pieces in slimtune/ops/lora_linear.py)
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
    # fp32 operands follow torch's matmul setting (off by default: exact fp32; tf32 costs ~3e-4 relative)
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block(limit: int, size: int) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(int(size), 1))))


def _w_args(base: NF4Weight | torch.Tensor, dx: bool):
    """(pointer args, stride_wk, stride_wn, (W_4BIT, NESTED, QBLOCK, QBLOCK2)) for Wop = Wᵀ (forward) or W (dx)."""
    if isinstance(base, NF4Weight):
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
    base: NF4Weight | torch.Tensor,
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
    base: NF4Weight | torch.Tensor,
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
    base: NF4Weight | torch.Tensor,
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
    base: NF4Weight | torch.Tensor,
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


def base_row_norm_sq(base: NF4Weight | torch.Tensor) -> torch.Tensor:
    """‖W_o‖² per output row, fp32 (out,), from the 4-bit codes directly."""
    n_out, n_in = base.shape
    device = base.device
    out = torch.empty(n_out, dtype=torch.float32, device=device)
    ptrs, stride_wk, stride_wn, (w4, nested, qblock, qblock2) = _w_args(base, dx=False)
    # rows are the n axis here: stride of o is stride_wn, stride of i is stride_wk
    bn, bk = 16, _block(128, n_in)
    if n_out:
        _row_norm_sq_kernel[(triton.cdiv(n_out, bn),)](
            *ptrs, out, n_out, n_in, stride_wn, stride_wk, W_4BIT=w4, NESTED=nested, QBLOCK=qblock,
            QBLOCK2=qblock2, BLOCK_N=bn, BLOCK_K=bk,
        )
    return out


TRITON_OPS = SimpleNamespace(
    base_matmul=base_matmul, base_matmul_t=base_matmul_t, base_dmag=base_dmag, base_row_norm_sq=base_row_norm_sq
)
TORCH_OPS = SimpleNamespace(
    base_matmul=torch_base_matmul,
    base_matmul_t=torch_base_matmul_t,
    base_dmag=torch_base_dmag,
    base_row_norm_sq=torch_base_row_norm_sq,
)


def backend_ops(backend: str) -> SimpleNamespace:
    """The four pieces for "triton" or "torch"; the Functions call nothing else that touches W."""
    return TRITON_OPS if backend == "triton" else TORCH_OPS


# ----------------------------------------------------------------------------------------------------------------
# one projection: forward / backward math shared by the linear, MLP and q/k/v Functions
# ----------------------------------------------------------------------------------------------------------------


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def dora_norm(ops: SimpleNamespace, proj: LoRAProjection, lora_A, lora_B, lora_M) -> torch.Tensor:
    """n = ‖W + s·B M A‖ per row (fp32, no grad) without materialising W:

    n² = ‖W_o‖² + 2s·⟨B_o, (A' Wᵀ)ᵀ_o⟩ + s²·B_o (A' A'ᵀ) B_oᵀ,  A' = M A  (r, in); A' Wᵀ is an (r, out) GEMM.
    """
    with torch.no_grad():
        wsq = proj.base_norm_sq if proj.base_norm_sq is not None else ops.base_row_norm_sq(proj.base)
        wsq = wsq.float()
        if lora_A is None:
            return wsq.sqrt()
        a = lora_A.float() if lora_M is None else lora_M.float() @ lora_A.float()
        b = lora_B.float()
        s = proj.scale
        p = ops.base_matmul(a.contiguous(), proj.base)  # (r, out) fp32
        cross = (b * p.T).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        return (wsq + 2.0 * s * cross + (s * s) * quad).clamp_min(0.0).sqrt()


def dropout_seed(proj: LoRAProjection) -> int | None:
    """A fresh seed for the projection's LoRA dropout mask (None without dropout or adapter).

    Drawn from torch's default CPU generator (no device sync; reproducible under torch.manual_seed and resumable
    from the saved RNG state); the (T, in) mask itself is regenerated from it in backward, never saved.
    """
    if proj.dropout <= 0.0 or proj.lora_A is None:
        return None
    return int(torch.randint(0, 2**62, (1,)).item())


def _dropped(x: torch.Tensor, proj: LoRAProjection, seed: int) -> torch.Tensor:
    """drop(x): a transient (T, in) copy."""
    return dropout_mask(x.shape, proj.dropout, seed, device=x.device, dtype=x.dtype).mul_(x)


def projection_forward(
    ops: SimpleNamespace,
    x: torch.Tensor,
    proj: LoRAProjection,
    factors: tuple,
    *,
    seed: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y (T, out) = the projection of x (T, in); also returns xa = drop(X) Aᵀ (T, r) and the DoRA norm n (out,).

    `seed` (from `dropout_seed`) switches on LoRA dropout; pass the same seed to the backward functions.
    """
    lora_A, lora_B, lora_M, magnitude, bias = factors
    dt = x.dtype
    xa = xam = norm = scale_vec = None
    if lora_A is not None:
        xa = (x if seed is None else _dropped(x, proj, seed)) @ lora_A.to(dt).T
        xam = xa if lora_M is None else xa @ lora_M.to(dt).T
    if magnitude is not None:
        norm = dora_norm(ops, proj, lora_A, lora_B, lora_M)
        scale_vec = magnitude.float() / norm
    y = ops.base_matmul(
        x, proj.base, lora_left=xam, lora_right=None if lora_B is None else lora_B.to(dt).T,
        lora_scale=proj.scale, out_scale=scale_vec, bias=bias, out=out,
    )
    return y, xa, norm


def projection_backward(
    ops: SimpleNamespace,
    dy: torch.Tensor,
    x: torch.Tensor | None,
    proj: LoRAProjection,
    factors: tuple,
    xa: torch.Tensor | None,
    norm: torch.Tensor | None,
    *,
    needs: tuple[bool, ...],
    seed: int | None = None,
) -> tuple[tuple, torch.Tensor | None]:
    """Factor gradients (dA, dB, dM, dmag, dbias) of one projection, and G·M (T, r) for `projection_grad_input`.

    `needs` = (x, A, B, M, mag, bias) flags. With c = m/n (DoRA) or 1, dz = dY·c, G = s·dz B (T, r),
    xam = xa Mᵀ:  dB = s·dzᵀ xam,  dM = Gᵀ xa,  dA = (G M)ᵀ X,  dm = Σ_t dY ⊙ z / n,  dbias = Σ_t dY
    (and dX = dz W + (G M) A in `projection_grad_input`). x is only read for dA and dm, so a caller may reuse x's
    storage for dX after this returns.
    """
    need_x, need_a, need_b, need_m, need_mag, need_bias = needs
    lora_A, lora_B, lora_M, magnitude, bias = factors
    dt = dy.dtype
    s = proj.scale
    da = db = dm = dmag = dbias = gm = xam = b_c = None
    c = None if magnitude is None else magnitude.float() / norm
    if lora_A is not None:
        b_c, m_c = lora_B.to(dt), _cast(lora_M, dt)
        if need_b or need_mag:
            xam = xa if m_c is None else xa @ m_c.T
        if need_b:
            dyt_xam = dy.T @ xam  # (out, r)
            db = (dyt_xam.float() * (s if c is None else s * c[:, None])).to(lora_B.dtype)
        if need_x or need_a or need_m:
            b_eff = b_c if c is None else (b_c.float() * c[:, None]).to(dt)
            g = (dy @ b_eff) * s  # (T, r)
            if need_m:
                dm = (g.T @ xa).to(lora_M.dtype)
            gm = g if m_c is None else g @ m_c
            if need_a:
                da = (gm.T @ (x if seed is None else _dropped(x, proj, seed))).to(lora_A.dtype)
    if need_mag:
        zdy = ops.base_dmag(
            x, dy, proj.base, lora_left=xam, lora_right=None if b_c is None else b_c.T, lora_scale=s
        )
        dmag = (zdy / norm).to(magnitude.dtype)
    if need_bias:
        dbias = dy.float().sum(0).to(bias.dtype)
    return (da, db, dm, dmag, dbias), gm


def projection_grad_input(
    ops: SimpleNamespace,
    dy: torch.Tensor,
    proj: LoRAProjection,
    factors: tuple,
    norm: torch.Tensor | None,
    gm: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """dX = (dY·c) W + (G M) A: one GEMM with W dequantized on the fly; into `out` (added when `accumulate`).

    With dropout the adapter term is masked, ((G M) A) ⊙ mask, and added after the GEMM (untuned: no GPU).
    """
    lora_A, _, _, magnitude, _ = factors
    c = None if magnitude is None else magnitude.float() / norm
    a_c = None if gm is None else lora_A.to(dy.dtype)
    if seed is None or gm is None:
        return ops.base_matmul_t(
            dy, proj.base, out_scale=c, lora_left=gm, lora_right=a_c, out=out, accumulate=accumulate
        )
    dx = ops.base_matmul_t(dy, proj.base, out_scale=c, out=out, accumulate=accumulate)
    shape = (dy.shape[0], proj.shape[1])
    return dx.addcmul_(gm @ a_c, dropout_mask(shape, proj.dropout, seed, device=dy.device, dtype=dy.dtype))


def factor_needs(proj_factors: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[bool, ...]:
    """(A, B, M, mag, bias) grad flags: only for tensors that exist and need a gradient."""
    return tuple(t is not None and bool(n) for t, n in zip(proj_factors, needs_input_grad, strict=True))


def saved_for(factors: tuple, needs: tuple[bool, ...]) -> tuple[bool, bool]:
    """(keep x, keep xa) for one projection, given its factor `needs`: x only for dA / dm; xa for dB / dM / dm."""
    need_a, need_b, need_m, need_mag, _ = needs
    keep_x = need_a or need_mag
    keep_xa = factors[0] is not None and (need_b or need_m or need_mag)
    return keep_x, keep_xa


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------------


class QLoRALinearFunction(torch.autograd.Function):
    """y = proj(x) for x (T, in). Saves X (only when dA or dm is needed), X Aᵀ (T, r) and the DoRA norm (out,).

    Inputs after (x, proj, backend) are the factors in `LoRAProjection.factors()` order (A, B, M, mag, bias).
    """

    @staticmethod
    def forward(ctx, x, proj: LoRAProjection, backend: str, *factors):
        ops = backend_ops(backend)
        seed = dropout_seed(proj)
        y, xa, norm = projection_forward(ops, x, proj, factors, seed=seed)
        needs = factor_needs(factors, ctx.needs_input_grad[3:])
        keep_x, keep_xa = saved_for(factors, needs)
        ctx.proj, ctx.backend, ctx.needs, ctx.seed = proj, backend, needs, seed
        ctx.save_for_backward(x if keep_x else None, xa if keep_xa else None, norm, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, norm, *factors = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs)
        ops, dy, factors = backend_ops(ctx.backend), dy.contiguous(), tuple(factors)
        grads, gm = projection_backward(ops, dy, x, ctx.proj, factors, xa, norm, needs=needs, seed=ctx.seed)
        dx = projection_grad_input(ops, dy, ctx.proj, factors, norm, gm, seed=ctx.seed) if needs[0] else None
        return (dx, None, None, *grads)


def qlora_linear(x: torch.Tensor, *, proj: LoRAProjection, backend: str = "triton") -> torch.Tensor:
    """The QLoRA linear for a 2-D x (T, in) on the given backend ("triton" | "torch")."""
    if x.dim() != 2:
        raise ValueError(f"qlora_linear expects a 2-D (tokens, in) input, got shape {tuple(x.shape)}")
    if x.shape[1] != proj.shape[1]:
        raise ValueError(f"qlora_linear: input has {x.shape[1]} features, base weight expects {proj.shape[1]}")
    return QLoRALinearFunction.apply(x, proj, backend, *proj.factors())

