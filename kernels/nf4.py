"""Triton: in-register dequantization of bitsandbytes 4-bit weights (NF4/FP4, optional double quant).

`dequant_4bit` is the building block the GEMM kernels call inside their K loop: given the flat row-major index
f = o*in + i of every element of a tile (any 2-D arrangement, so the same helper serves the W tile of X Wᵀ and the
transposed tile of dY W), it loads the packed bytes, picks the nibble, looks up the 16-entry code, and multiplies by
the block's absmax (itself decoded from its 8-bit code when double-quantized). The format is described in
slimtune/ops/nf4.py, whose plain-torch `NF4Weight.dequantize` is the reference.

`nf4_dequantize` (a standalone kernel writing the whole W) serves the tests and the "dequant" backend of
slimtune/ops/gemm_dequant.py where bitsandbytes is not installed (it writes into that backend's reused buffer).

Like every module of slimtune.kernels this one imports only torch and triton: the weight argument `w` is any
object with the fields of `slimtune.ops.nf4.NF4Weight` (packed, code, absmax, nested, absmax_code, absmax_scale,
absmax_offset, blocksize, absmax_blocksize, shape, dtype, device).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["dequant_4bit", "nf4_pointer_args", "nf4_dequantize", "COMPILE_VARIANTS"]


@triton.jit
def dequant_4bit(
    packed_ptr,  # uint8 (n/2,)
    code_ptr,  # fp32 (16,)
    absmax_ptr,  # fp32 (n_blocks,), or uint8 (n_blocks,) when NESTED
    absmax_code_ptr,  # fp32 (256,)          (NESTED only)
    absmax_scale_ptr,  # fp32 (n_blocks/256,) (NESTED only)
    absmax_offset,  # fp32 scalar value      (NESTED only; load it once, outside the K loop)
    flat,  # int64 tile of flat indices o*in + i
    mask,  # bool tile: which elements exist
    QBLOCK: tl.constexpr,  # values per absmax (64)
    NESTED: tl.constexpr,
    QBLOCK2: tl.constexpr,  # absmax per second-level scale (256)
):
    """fp32 tile W[flat] (0 where ~mask)."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)  # high nibble first
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // QBLOCK
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // QBLOCK2, mask=mask, other=0.0)
        # bitsandbytes: code2[q] * absmax2 then + offset (two roundings; a GPU compiler may fuse them into one
        # FMA, which can move absmax by one ulp: irrelevant inside a GEMM)
        absmax = tl.load(absmax_code_ptr + q, mask=mask, other=0.0) * scale + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * absmax, 0.0)


def nf4_pointer_args(w) -> tuple:
    """(packed, code, absmax, absmax_code, absmax_scale, absmax_offset) tensors for a kernel launch.

    For a weight without double quant the last three are placeholders the kernel never reads.
    """
    if w.nested:
        return (w.packed, w.code, w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset)
    return (w.packed, w.code, w.absmax, w.code, w.code, w.code)


@triton.jit
def _dequantize_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    out_ptr,
    n,
    QBLOCK: tl.constexpr,
    NESTED: tl.constexpr,
    QBLOCK2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    offset = 0.0
    if NESTED:
        offset = tl.load(absmax_offset_ptr)
    w = dequant_4bit(
        packed_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset, flat, mask, QBLOCK, NESTED,
        QBLOCK2,
    )
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


DEQUANT_BLOCK = 1024  # values per program (untuned: no GPU)


def nf4_dequantize(w, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None, block: int = DEQUANT_BLOCK):
    """W (out, in) dequantized by the Triton kernel (same values as `NF4Weight.dequantize`), into `out` if given."""
    if out is None:
        out = torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
    n = w.shape[0] * w.shape[1]
    if n:
        with device_guard(out):
            _dequantize_kernel[(triton.cdiv(n, block),)](
                *nf4_pointer_args(w), out, n, QBLOCK=w.blocksize, NESTED=w.nested, QBLOCK2=w.absmax_blocksize,
                BLOCK=block,
            )
    return out


def device_guard(t: torch.Tensor):
    """`torch.cuda.device(t.device)` for a CUDA tensor (a launch goes to t's GPU, not the current one), else a no-op."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Kernel variants a training run launches (the compile matrix, tests/kernels/test_compile_matrix.py): the dequant
# kernel is only used by the "dequant" backend without bitsandbytes; bf16 output, NF4 with and without double quant.
COMPILE_VARIANTS = [
    {
        "name": f"nf4_dequantize[{'dq' if nested else 'nf4'}]",
        "kernel": "_dequantize_kernel",
        "signature": {
            "packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if nested else "*fp32",
            "absmax_code_ptr": "*fp32", "absmax_scale_ptr": "*fp32", "absmax_offset_ptr": "*fp32",
            "out_ptr": "*bf16", "n": "i64",
        },
        "constexprs": {"QBLOCK": 64, "NESTED": nested, "QBLOCK2": 256, "BLOCK": DEQUANT_BLOCK},
        "num_warps": 4,
        "num_stages": 2,
    }
    for nested in (False, True)
]
