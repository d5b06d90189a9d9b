"""Chunked linear cross-entropy: the Triton row kernels and their launchers (primitives of slimtune/ops/linear_ce.py).

The GEMMs (x_c Wᵀ, dlogits W, dlogitsᵀ x_c) are torch matmuls (cuBLAS) on both backends; these kernels do the
per-row work on a chunk of logits, with the optional softcap cap(z) = s·tanh(z/s) applied on the fly:

* ``_ce_rows_kernel`` (dense head, whole vocabulary per row): an online logsumexp, the row loss, and — when a
  gradient is wanted — the overwrite of the logits by (softmax − onehot)·cap'(z).
* ``_ce_block_stats_kernel`` / ``_ce_block_grad_kernel`` (streamed NF4 head, one vocabulary block of columns
  v0 … v0+Vb−1 per launch): fold the block into running (max, Σ exp, target logit) per row; then, with the final
  lse, overwrite the block by its dlogits.

The math, what is saved, and the autograd Function are in slimtune/ops/linear_ce.py. Imports only torch, triton
and slimtune.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.lora_mlp import tanh
from slimtune.kernels.nf4 import device_guard

__all__ = ["ce_rows_triton", "ce_block_stats_triton", "ce_block_grad_triton", "COMPILE_VARIANTS"]


@triton.jit
def _load_capped(ptr, mask, softcap, SOFTCAP: tl.constexpr):
    """fp32 logits (−inf where ~mask), softcapped when SOFTCAP."""
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap * tanh(z / softcap)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _dlogits(z, lse, is_target, keep, softcap, SOFTCAP: tl.constexpr):
    """(softmax − onehot)·cap'(z) for capped logits z, zeroed on ignored rows (keep = 0)."""
    g = (tl.exp(z - lse) - tl.where(is_target, 1.0, 0.0)) * keep
    if SOFTCAP:
        r = tl.maximum(z / softcap, -1.0)  # |cap(z)| <= s; −inf (masked lanes) -> −1, a zero factor, not NaN
        g = g * (1.0 - r * r)
    return g


@triton.jit
def _ce_rows_kernel(
    logits_ptr, targets_ptr, loss_ptr,
    stride_row, V, ignore_index, softcap,
    GRAD: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    t = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # pass 1: online max / sum of exponentials over the vocabulary
    m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    for off in range(0, V, BLOCK_V):
        z = _load_capped(base + off + cols, off + cols < V, softcap, SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    t_safe = tl.where(valid, t, 0)
    z_t = tl.load(base + t_safe).to(tl.float32)
    if SOFTCAP:
        z_t = softcap * tanh(z_t / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    if GRAD:
        # pass 2: dlogits written over the logits (zeros on ignored rows)
        keep = tl.where(valid, 1.0, 0.0)
        for off in range(0, V, BLOCK_V):
            c = off + cols
            cmask = c < V
            z = _load_capped(base + c, cmask, softcap, SOFTCAP)
            g = _dlogits(z, lse, c == t, keep, softcap, SOFTCAP)
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _ce_block_stats_kernel(
    logits_ptr, targets_ptr, m_ptr, s_ptr, zt_ptr,
    stride_row, Vb, v0, softcap,
    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    for off in range(0, Vb, BLOCK_V):
        z = _load_capped(base + off + cols, off + cols < Vb, softcap, SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    local = tl.load(targets_ptr + row).to(tl.int64) - v0
    inside = (local >= 0) & (local < Vb)
    z_t = tl.load(base + tl.where(inside, local, 0)).to(tl.float32)
    if SOFTCAP:
        z_t = softcap * tanh(z_t / softcap)
    zt = tl.load(zt_ptr + row)
    tl.store(zt_ptr + row, tl.where(inside, z_t, zt))


@triton.jit
def _ce_block_grad_kernel(
    logits_ptr, targets_ptr, lse_ptr,
    stride_row, Vb, v0, ignore_index, softcap,
    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(targets_ptr + row).to(tl.int64)
    keep = tl.where(t != ignore_index, 1.0, 0.0)
    lse = tl.load(lse_ptr + row)
    for off in range(0, Vb, BLOCK_V):
        c = off + cols
        cmask = c < Vb
        z = _load_capped(base + c, cmask, softcap, SOFTCAP)
        g = _dlogits(z, lse, c + v0 == t, keep, softcap, SOFTCAP)
        tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=cmask)



def _block_v(v: int, cuda: bool) -> int:
    return min(triton.next_power_of_2(max(v, 1)), 4096 if cuda else 1024)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _cap_args(softcap: float | None) -> tuple[float, bool]:
    return (1.0, False) if softcap is None else (float(softcap), True)


def ce_rows_triton(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, grad: bool, softcap: float | None = None
) -> torch.Tensor:
    """Same contract as slimtune.ops.linear_ce.ce_rows_ref: per-row loss (c,) fp32, dlogits in place if grad."""
    c, V = logits.shape
    loss = torch.empty((c,), dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    block = _block_v(V, logits.is_cuda)
    cap, use_cap = _cap_args(softcap)
    with device_guard(logits):
        _ce_rows_kernel[(c,)](
            logits, targets, loss, logits.stride(0), V, ignore_index, cap,
            GRAD=grad, SOFTCAP=use_cap, BLOCK_V=block, num_warps=_num_warps(block),
        )
    return loss


def ce_block_stats_triton(
    logits: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor, *,
    v0: int, softcap: float | None = None,
) -> None:
    """Same contract as slimtune.ops.linear_ce.ce_block_stats_ref (m, s, zt fp32 (c,), updated in place)."""
    c, Vb = logits.shape
    if c == 0:
        return
    block = _block_v(Vb, logits.is_cuda)
    cap, use_cap = _cap_args(softcap)
    with device_guard(logits):
        _ce_block_stats_kernel[(c,)](
            logits, targets, m, s, zt, logits.stride(0), Vb, v0, cap,
            SOFTCAP=use_cap, BLOCK_V=block, num_warps=_num_warps(block),
        )


def ce_block_grad_triton(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *, v0: int, ignore_index: int,
    softcap: float | None = None,
) -> None:
    """Same contract as slimtune.ops.linear_ce.ce_block_grad_ref (dlogits of the block, in place)."""
    c, Vb = logits.shape
    if c == 0:
        return
    block = _block_v(Vb, logits.is_cuda)
    cap, use_cap = _cap_args(softcap)
    with device_guard(logits):
        _ce_block_grad_kernel[(c,)](
            logits, targets, lse, logits.stride(0), Vb, v0, ignore_index, cap,
            SOFTCAP=use_cap, BLOCK_V=block, num_warps=_num_warps(block),
        )


# ----------------------------------------------------------------------------------------------------------------
# the launches a training run makes, for the AOT compile matrix (tests/kernels/test_compile_matrix.py): dicts with
# name, kernel (attribute name), signature (runtime args), constexprs, num_warps, num_stages
# ----------------------------------------------------------------------------------------------------------------


def _compile_variants() -> list[dict]:
    out = []
    block = _block_v(1 << 17, True)  # every real vocabulary (32k-262k) and vocabulary block is above 4096
    for dt in ("bf16", "fp16", "fp32"):
        for cap in (False, True):  # Gemma-2: final_logit_softcapping
            tag = f"{dt},softcap={int(cap)}"
            for grad in (False, True):
                out.append({
                    "name": f"ce_rows[{tag},grad={int(grad)}]", "kernel": "_ce_rows_kernel",
                    "signature": {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                                  "stride_row": "i32", "V": "i32", "ignore_index": "i32", "softcap": "fp32"},
                    "constexprs": {"GRAD": grad, "SOFTCAP": cap, "BLOCK_V": block},
                    "num_warps": _num_warps(block), "num_stages": 2,
                })
            out.append({
                "name": f"ce_block_stats[{tag}]", "kernel": "_ce_block_stats_kernel",
                "signature": {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                              "zt_ptr": "*fp32", "stride_row": "i32", "Vb": "i32", "v0": "i32", "softcap": "fp32"},
                "constexprs": {"SOFTCAP": cap, "BLOCK_V": block}, "num_warps": _num_warps(block), "num_stages": 2,
            })
            out.append({
                "name": f"ce_block_grad[{tag}]", "kernel": "_ce_block_grad_kernel",
                "signature": {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "lse_ptr": "*fp32", "stride_row": "i32",
                              "Vb": "i32", "v0": "i32", "ignore_index": "i32", "softcap": "fp32"},
                "constexprs": {"SOFTCAP": cap, "BLOCK_V": block}, "num_warps": _num_warps(block), "num_stages": 2,
            })
    return out


COMPILE_VARIANTS: list[dict] = _compile_variants()
