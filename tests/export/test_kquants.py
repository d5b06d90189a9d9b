"""K-quant quantizers: block layouts gguf's dequantizer reads, the reference search, the mixes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from slimtune.export.kquants import quantize_k
from slimtune.export.mixes import tensor_type, use_more_bits


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 7] += 0.2  # an outlier column, as real weights have
    w[3] = 0.0  # an all-zero row: d = 0 must not divide by zero
    w[5, :256] = 0.01  # a constant block
    return w


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


# ----------------------------------------------------------------------------- scalar reference transcription
# llama.cpp's reference algorithm (quantize_row_q{4,6}_K_ref without imatrix) written block by block, value by value;
# the vectorised quantizer must give the same bytes' meaning (same dequantized values).


def _nearest(x: float) -> int:
    return int(np.rint(np.float32(x)))


def _ref_qkx2(x, w, nmax, rmin, rdelta, nstep):
    mn, mx = min(min(x), 0.0), max(x)
    if mx == mn:
        return 0.0, -mn
    iscale = nmax / (mx - mn)
    scale = 1 / iscale
    L = [min(nmax, max(0, _nearest(iscale * (v - mn)))) for v in x]
    best = sum(wi * (scale * l + mn - v) ** 2 for wi, l, v in zip(w, L, x))
    best_min = mn
    for k in range(nstep + 1):
        iscale = (rmin + rdelta * k + nmax) / (mx - mn)
        La = [min(nmax, max(0, _nearest(iscale * (v - mn)))) for v in x]
        sw, sl = sum(w), sum(wi * l for wi, l in zip(w, La))
        sl2 = sum(wi * l * l for wi, l in zip(w, La))
        sxl = sum(wi * l * v for wi, l, v in zip(w, La, x))
        sx = sum(wi * v for wi, v in zip(w, x))
        D = sw * sl2 - sl * sl
        if D > 0:
            s = (sw * sxl - sx * sl) / D
            m = (sl2 * sx - sl * sxl) / D
            if m > 0:
                m, s = 0.0, sxl / sl2
            err = sum(wi * (s * l + m - v) ** 2 for wi, l, v in zip(w, La, x))
            if err < best:
                best, scale, best_min = err, s, m
    return scale, -best_min


def _ref_q4_k_values(block: np.ndarray) -> np.ndarray:
    x = block.astype(np.float64)
    av = math.sqrt(float((x * x).sum()) / 256)
    scales, mins = [], []
    for j in range(8):
        sub = list(x[32 * j : 32 * j + 32])
        s, m = _ref_qkx2(sub, [av + abs(v) for v in sub], 15, -1.0, 0.1, 20)
        scales.append(s)
        mins.append(m)
    ms, mm = max(scales), max(mins)
    ls = [min(63, _nearest(63 / ms * s)) if ms > 0 else 0 for s in scales]
    lm = [min(63, _nearest(63 / mm * m)) if mm > 0 else 0 for m in mins]
    d, dmin = float(np.float16(ms / 63)), float(np.float16(mm / 63))
    out = np.zeros(256)
    for j in range(8):
        dd, dm = d * ls[j], dmin * lm[j]
        for i in range(32):
            v = x[32 * j + i]
            q = 0 if dd == 0 else min(15, max(0, _nearest((v + dm) / dd)))
            out[32 * j + i] = dd * q - dm
    return out


def _ref_q6_k_values(block: np.ndarray) -> np.ndarray:
    x = block.astype(np.float64)
    scales = []
    for j in range(16):
        sub = x[16 * j : 16 * j + 16]
        mx = sub[np.argmax(np.abs(sub))]
        if abs(mx) < 1e-15:
            scales.append(0.0)
            continue
        best_s, best = 0.0, -1.0
        for step in [0.0] + [0.1 * i for i in range(-9, 10) if i != 0]:
            iscale = -(32 + step) / mx
            L = [min(31, max(-32, _nearest(iscale * v))) for v in sub]
            sumlx = sum(v * v * v * l for v, l in zip(sub, L))
            suml2 = sum(v * v * l * l for v, l in zip(sub, L))
            if suml2 > 0 and (best < 0 or sumlx * sumlx > best * suml2):
                best_s, best = sumlx / suml2, sumlx * sumlx / suml2
        scales.append(best_s)
    ms = scales[int(np.argmax(np.abs(scales)))]
    out = np.zeros(256)
    if abs(ms) < 1e-15:
        return out
    iscale = -128 / ms
    d = float(np.float16(1 / iscale))
    for j in range(16):
        dd = d * min(127, _nearest(iscale * scales[j]))
        for i in range(16):
            q = 0 if dd == 0 else min(31, max(-32, _nearest(x[16 * j + i] / dd)))
            out[16 * j + i] = dd * q
    return out


@pytest.mark.parametrize("qtype, ref", [("Q4_K", _ref_q4_k_values), ("Q6_K", _ref_q6_k_values)])
def test_vectorised_matches_scalar_reference(qtype, ref):
    w = _weights(8, 256, seed=1)
    got = quants.dequantize(quantize_k(w, qtype), T[qtype])
    want = np.stack([ref(w[i].numpy()) for i in range(w.shape[0])])
    # float32 (vectorised sums) vs float64 (scalar sums) may pick a different candidate in a near-tie: allow a few
    # elements, each off by at most one quantization step
    close = np.isclose(got, want, rtol=0, atol=1e-6)
    assert close.mean() > 0.99, f"{qtype}: {(~close).sum()} of {close.size} values differ from the reference"
    assert _rel_rms(got, w.numpy()) <= 1.05 * _rel_rms(want, w.numpy())


@pytest.mark.parametrize("qtype, bound, simpler", [("Q4_K", 0.085, T.Q4_0), ("Q5_K", 0.043, T.Q5_0), ("Q6_K", 0.021, T.Q5_1)])
def test_layout_dequantizes_with_gguf(qtype, bound, simpler):
    """gguf.quants.dequantize reads our bytes back: error at the K-quant's level, below the simpler type's."""
    w = _weights(48, 768)
    data = quantize_k(w, qtype)
    assert data.dtype == np.uint8 and data.shape == quants.quant_shape_to_byte_shape(w.shape, T[qtype])
    deq = quants.dequantize(data, T[qtype])
    err = _rel_rms(deq, w.numpy())
    base = _rel_rms(quants.dequantize(quants.quantize(w.numpy(), simpler), simpler), w.numpy())
    assert err < bound and err < base, (qtype, err, base)
    assert np.all(deq[3] == 0)  # the zero row stays exactly zero


def test_rows_must_hold_whole_superblocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(2, 576), "Q4_K")


def test_mixes_follow_llamacpp():
    n = 32
    # a 4096-wide Llama: attn_v / ffn_down take Q6_K on the picked layers, Q4_K elsewhere
    assert [i for i in range(n) if use_more_bits(i, n)][:8] == [0, 1, 2, 3, 6, 9, 12, 15]
    assert tensor_type("blk.0.attn_v.weight", (1024, 4096), "Q4_K_M", n_layer=n, tied=False) == T.Q6_K
    assert tensor_type("blk.4.attn_v.weight", (1024, 4096), "Q4_K_M", n_layer=n, tied=False) == T.Q4_K
    assert tensor_type("blk.6.ffn_down.weight", (4096, 14336), "Q5_K_M", n_layer=n, tied=False) == T.Q6_K
    assert tensor_type("blk.4.attn_q.weight", (4096, 4096), "Q5_K_M", n_layer=n, tied=False) == T.Q5_K
    assert tensor_type("output.weight", (32000, 4096), "Q4_K_M", n_layer=n, tied=False) == T.Q6_K
    assert tensor_type("token_embd.weight", (32000, 4096), "Q4_K_M", n_layer=n, tied=False) == T.Q4_K
    assert tensor_type("token_embd.weight", (32000, 4096), "Q4_K_M", n_layer=n, tied=True) == T.Q6_K
    assert tensor_type("output.weight", (32000, 4096), "Q8_0", n_layer=n, tied=False) == T.Q8_0
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "Q4_K_M", n_layer=n, tied=False) == T.F32
    # rows that are not whole super-blocks (SmolLM2's 576): llama.cpp's fallbacks
    assert tensor_type("blk.4.attn_q.weight", (576, 576), "Q4_K_M", n_layer=30, tied=True) == T.Q5_0
    assert tensor_type("blk.4.attn_q.weight", (576, 576), "Q5_K_M", n_layer=30, tied=True) == T.Q5_1
    assert tensor_type("blk.4.attn_q.weight", (576, 576), "Q6_K", n_layer=30, tied=True) == T.Q8_0
    assert tensor_type("token_embd.weight", (49152, 576), "Q4_K_M", n_layer=30, tied=True) == T.Q8_0
    assert tensor_type("blk.4.attn_q.weight", (576, 576), "F16", n_layer=30, tied=True) == T.F16


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_llamacpp_quantize_fns_bound(qtype):
    """llama.cpp's own CI bound for its quantizers (tests/test-quantize-fns.cpp): on x_i = 0.1 + 2·cos(i),
    4096 values, sqrt(Σ(x − deq(q(x)))²) / n < 0.002 for every 4-bit-and-up type."""
    x = (0.1 + 2 * np.cos(np.arange(32 * 128, dtype=np.float32))).astype(np.float32)[None, :]
    deq = quants.dequantize(quantize_k(torch.from_numpy(x), qtype), T[qtype])
    err = float(np.sqrt(((x.astype(np.float64) - deq) ** 2).sum()) / x.size)
    assert err < 0.002, (qtype, err)
