"""The "dequant" backend of the base GEMMs: dequantize W into a reused buffer, then one vendor GEMM (cuBLAS on CUDA).

Same four primitives, names and signatures as slimtune/ops/gemm_torch.py (see there). What differs:

* W (out, in) is dequantized into one scratch buffer per (device, dtype), grown to the largest weight seen and
  reused by every layer (Llama-3.1-8B: 14336 x 4096 bf16 = 112 MiB, once, instead of one transient W per call).
  Writers, in order of preference: bitsandbytes' `dequantize_4bit(out=...)` (its CUDA kernel on a GPU), the Triton
  dequant kernel (slimtune/kernels/nf4.py) on CUDA sm_80+ without bitsandbytes, the exact torch reference otherwise
  (and always where 4-bit blocks straddle rows: bitsandbytes' CPU kernel is wrong there, tests/kernels/test_nf4.py).
* The GEMMs are `torch.mm`/`addmm` with `out=` and in-place `addmm_` for the LoRA term: no (T, out) temporaries.
* The DoRA column scale c = m/n is folded into the buffer's rows (c·W, out x in) and into the LoRA right factor
  (r x out) instead of a pass over the (T, out) output, so dX = (dY·c) W reads dY once.

The buffer is overwritten by the next call: nothing returned here aliases it, and every GEMM that reads it is
issued before the next dequantization on the same stream (one stream: kernels run in issue order).
The issue-12 audit estimates this path at ≈1.4 ms for M = 8192, 4096 -> 14336 on an H100 (bitsandbytes' dequant
+ cuBLAS), 7-12x faster than the fused Triton GEMM there; bench/gpu_check.sh measures both.
"""

from __future__ import annotations

import importlib.util

import torch

from slimtune.ops.dispatch import triton_allowed, triton_module
from slimtune.ops.nf4 import NF4Weight

__all__ = ["base_matmul", "base_matmul_t", "base_dmag", "base_row_norm_sq", "release_buffers", "buffer_bytes"]

Base = NF4Weight | torch.Tensor

_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_bnb_ok: bool | None = None
_no_out_variant: set[str] = set()  # device types where bitsandbytes' dequantize_4bit has no out= kernel
_NORM_ROWS = 2048  # rows per chunk of ‖W_o‖² (bounds the fp32 temporary at 2048 x in)


def _bnb_available() -> bool:
    global _bnb_ok
    if _bnb_ok is None:
        _bnb_ok = importlib.util.find_spec("bitsandbytes") is not None
    return _bnb_ok


def release_buffers() -> None:
    """Free the scratch buffers (they are re-created on the next call)."""
    _buffers.clear()


def buffer_bytes() -> int:
    """Bytes held by the scratch buffers now."""
    return sum(b.numel() * b.element_size() for b in _buffers.values())


def _scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) view of the per-(device, dtype) buffer, grown to fit (never kept per layer)."""
    n = shape[0] * shape[1]
    key = (torch.device(device), dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        _buffers.pop(key, None)  # free the old one before allocating the larger one
        buf = _buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _writer(base: NF4Weight, dtype: torch.dtype) -> str:
    """Who writes W into the buffer: "bnb", "triton" or "torch" (see the module docstring)."""
    aligned = base.in_features % base.blocksize == 0  # every row holds whole blocks
    qs = base.quant_state
    if aligned and qs is not None and qs.dtype == dtype and _bnb_available():
        return "bnb"
    # triton_allowed: not below sm_80, where the fused kernels are gated off too (issue 23: this writer was not)
    if base.device.type == "cuda" and triton_allowed(base.packed) and triton_module("nf4") is not None:
        return "triton"
    return "torch"


def _dequantize_into(base: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in `dtype`, written into the scratch buffer."""
    buf = _scratch(base.shape, dtype, base.device)
    writer = _writer(base, dtype)
    if writer == "bnb":
        import bitsandbytes.functional as bnbf  # optional dependency, imported on first use

        packed = base.packed.view(-1, 1)
        if base.device.type not in _no_out_variant:
            try:
                bnbf.dequantize_4bit(packed, base.quant_state, out=buf)
                return buf
            except NotImplementedError:  # bitsandbytes registers the out= variant for CUDA, not for CPU (0.50)
                _no_out_variant.add(base.device.type)
        return buf.copy_(bnbf.dequantize_4bit(packed, base.quant_state))
    if writer == "triton":
        return triton_module("nf4").nf4_dequantize(base, out=buf)
    return buf.copy_(base.dequantize(dtype))  # exact reference (CPU, or rows straddling blocks)


def _weight(base: Base, dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W, or diag(row_scale)·W, as a dense (out, in) `dtype` tensor (the buffer unless W can be used as it is)."""
    if isinstance(base, NF4Weight):
        w = _dequantize_into(base, dtype)
    elif base.dtype == dtype and row_scale is None:
        return base
    else:
        w = _scratch(tuple(base.shape), dtype, base.device).copy_(base)
    if row_scale is not None:
        w.mul_(row_scale.to(dtype)[:, None])
    return w


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
    """(x Wᵀ + lora_scale · lora_left @ lora_right) · out_scale + bias = x (cW)ᵀ + bias + s·L (R c)."""
    dt = x.dtype
    w = _weight(base, dt, out_scale)  # (out, in), DoRA scale folded in
    if out is None:
        out = torch.empty((x.shape[0], w.shape[0]), dtype=dt, device=x.device)
    if bias is not None:
        torch.addmm(bias.to(dt), x, w.T, out=out)  # bias in the GEMM epilogue
    else:
        torch.mm(x, w.T, out=out)
    if lora_left is not None:
        right = lora_right.to(dt) if out_scale is None else lora_right.to(dt) * out_scale.to(dt)  # (r, out)
        out.addmm_(lora_left, right, alpha=lora_scale)
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
    """(dy · out_scale) @ W + lora_left @ lora_right = dy (cW) + L R, added to `out` when `accumulate`."""
    dt = dy.dtype
    w = _weight(base, dt, out_scale)  # (out, in)
    if out is None:
        if accumulate:
            raise ValueError("base_matmul_t: accumulate=True needs out")
        out = torch.mm(dy, w)
    elif accumulate:
        out.addmm_(dy, w)
    else:
        torch.mm(dy, w, out=out)
    if lora_left is not None:
        out.addmm_(lora_left, lora_right.to(dt))
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
    """Σ_t dy ⊙ (x Wᵀ + lora_scale · lora_left @ lora_right): fp32 (out,), one (T, out) temporary."""
    z = base_matmul(x, base, lora_left=lora_left, lora_right=lora_right, lora_scale=lora_scale)
    return z.mul_(dy).sum(0, dtype=torch.float32)


def base_row_norm_sq(base: Base) -> torch.Tensor:
    """‖W_o‖² per output row, fp32 (out,), from W in its own dtype, in chunks of rows (bounded fp32 temporary)."""
    w = _weight(base, base.dtype)
    out = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, w.shape[0], _NORM_ROWS):
        out[r0 : r0 + _NORM_ROWS] = w[r0 : r0 + _NORM_ROWS].float().square().sum(1)
    return out
