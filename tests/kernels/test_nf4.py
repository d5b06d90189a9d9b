"""NF4/FP4 format: the torch reference and the Triton dequant kernel reproduce bitsandbytes exactly."""

from __future__ import annotations

import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from slimtune.kernels.nf4 import nf4_dequantize
from slimtune.ops.nf4 import NF4Weight, as_nf4_weight, dense_weight, dequantize_nf4, quantize_4bit

OUT, IN = 136, 200  # 27200 values = 425 blocks of 64; 2 second-level scales (425 > 256)


def _quantized(out_f, in_f, *, dtype, nested, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_bitsandbytes_exactly(dtype, nested, quant_type):
    packed, qs = _quantized(OUT, IN, dtype=dtype, nested=nested, quant_type=quant_type)
    expected = bnbf.dequantize_4bit(packed, qs, quant_type=quant_type)
    got = dequantize_nf4(packed, qs)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
    w = NF4Weight.from_quant_state(packed, qs)
    assert w.nested == nested and w.shape == (OUT, IN) and w.packed.data_ptr() == packed.data_ptr()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dequant_matches_bitsandbytes_exactly(dtype, nested):
    packed, qs = _quantized(OUT, IN, dtype=dtype, nested=nested, seed=1)
    expected = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
    w = NF4Weight.from_quant_state(packed, qs)
    # The Triton interpreter truncates fp32 -> bf16 instead of rounding (GPUs round to nearest even): under the
    # interpreter check bf16 through an fp32 output.
    out_dtype = torch.float32 if (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1") else dtype
    out = torch.full((OUT, IN), float("nan"), dtype=out_dtype)
    got = nf4_dequantize(w, out=out, block=2048)
    assert got is out
    assert torch.equal(got.to(dtype), expected)


def test_odd_tail_block_and_first_level_absmax():
    # 37*96 = 3552 values = 55.5 blocks: the last block is partial and blocks straddle rows. bitsandbytes' native
    # CPU dequantizer gets this case wrong (it is off by ~0.3 relative; CUDA and bnb's own torch implementation
    # agree with the flat layout), so compare with bnb's torch implementation and with the original weight.
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(37, 96, generator=g) * 0.05
    packed, qs = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = NF4Weight.from_quant_state(packed, qs)
    ref = w.dequantize()
    assert (ref - dense).norm() / dense.norm() < 0.12  # NF4 round-off, ~0.09
    from bitsandbytes.backends.default import ops as bnb_torch_ops

    if hasattr(bnb_torch_ops, "_dequantize_4bit_compute"):
        bnb_torch = bnb_torch_ops._dequantize_4bit_compute
        bnb_torch = getattr(bnb_torch, "__wrapped__", bnb_torch)  # skip bnb's torch.compile wrapper (seconds)
        expected = bnb_torch(
            packed.reshape(-1), w.block_absmax(), qs.code, 64, qs.shape, torch.float32
        )
        assert torch.equal(ref, expected)
    assert torch.equal(nf4_dequantize(w, block=256), w.dequantize())
    assert torch.equal(w.block_absmax(), bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)


def test_from_linear4bit_module_and_dense_passthrough():
    torch.manual_seed(3)
    lin = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    w_dense = torch.randn(OUT, IN) * 0.02
    lin.weight = bnb.nn.Params4bit(w_dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin = lin.to("cpu")  # quantizes
    base = as_nf4_weight(lin)
    assert isinstance(base, NF4Weight) and base.nested and base.shape == (OUT, IN)
    assert base.packed.data_ptr() == lin.weight.data.data_ptr()  # a view, not a copy
    expected = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state, quant_type="nf4")
    assert torch.equal(dense_weight(base, torch.float32), expected)
    plain = torch.nn.Linear(IN, OUT)
    assert as_nf4_weight(plain) is not None and torch.equal(as_nf4_weight(plain), plain.weight)
    q = quantize_4bit(w_dense, double_quant=False)
    assert not q.nested and (q.dequantize() - w_dense).norm() / w_dense.norm() < 0.15
