"""K-quant quantizers (Q4_K, Q5_K, Q6_K) in vectorised torch, writing the block layouts `gguf.quants` reads.

The `gguf` package dequantizes every K-quant but quantizes none of them. These follow llama.cpp's reference
quantizers without an importance matrix (what `llama-quantize` does when no imatrix is given):

- Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32, ``x ≈ d·sc_j·q − dmin·m_j`` with 6-bit sc_j, m_j and a
  4-bit (Q4_K) or 5-bit (Q5_K) q. Each sub-block's (scale, min) comes from a weighted least-squares search over
  candidate inverse scales (weights ``sqrt(mean(x²)) + |x|``), then the 8 scales and 8 mins are quantized to 6 bits
  against the super-block's largest, and q is recomputed with the quantized scales.
- Q6_K: 16 sub-blocks of 16, ``x ≈ d·sc_j·q`` with int8 sc_j and q in [−32, 31]; each sub-block's scale comes
  from an x²-weighted search of 19 inverse scales around 32/max.

All candidates of all sub-blocks are evaluated at once (tensors of shape (blocks, candidates, sub-block)), chunked
so a chunk stays ~16 MiB; nothing loops over blocks in Python.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
_CHUNK_ELEMS = 1 << 17  # elements per chunk: x (128K) × 21 candidates × 4 bytes ≈ 11 MiB of temporaries


def _f16(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the stored d / dmin are fp16; the final q uses the rounded value, as llama.cpp)."""
    return t.to(torch.float16).to(torch.float32)


def _best_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Weighted asymmetric scale search for sub-blocks ``x`` (N, n) with weights ``w`` (N, n).

    Returns (scale, neg_min) of shape (N,): ``x ≈ scale·q − neg_min`` with q in [0, nmax], neg_min ≥ 0.
    """
    mn = x.min(dim=-1).values.clamp(max=0.0)  # (N,)
    mx = x.max(dim=-1).values
    rng = mx - mn
    flat = rng <= 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    xm = (x - mn[:, None])[:, None, :]  # (N, 1, n)
    # candidate 0: the plain min/max grid; candidates 1..nstep+1: least-squares fits on shifted grids
    iscales = torch.cat([
        torch.full((1,), float(nmax)),
        rmin + rdelta * torch.arange(nstep + 1, dtype=torch.float32) + nmax,
    ])[None, :] / rng[:, None]  # (N, K)
    q = torch.round(iscales[:, :, None] * xm).clamp_(0, nmax)  # (N, K, n)
    wk = w[:, None, :]
    xk = x[:, None, :]
    sw = w.sum(-1)[:, None]
    sx = (w * x).sum(-1)[:, None]
    sl = (wk * q).sum(-1)
    sl2 = (wk * q * q).sum(-1)
    sxl = (wk * q * xk).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    safe_det = torch.where(ok, det, torch.ones_like(det))
    scale = (sw * sxl - sx * sl) / safe_det
    mins = (sl2 * sx - sl * sxl) / safe_det
    pos = mins > 0  # a positive min cannot be stored: refit the scale with min = 0
    scale = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), scale)
    mins = torch.where(pos, torch.zeros_like(mins), mins)
    scale[:, 0] = 1.0 / iscales[:, 0]
    mins[:, 0] = mn
    ok[:, 0] = True
    err = (wk * (scale[:, :, None] * q + mins[:, :, None] - xk) ** 2).sum(-1)  # (N, K)
    err = torch.where(ok, err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=-1, keepdim=True)  # first minimum wins, as the reference's strict "<"
    s = scale.gather(1, best)[:, 0]
    m = mins.gather(1, best)[:, 0]
    s = torch.where(flat, torch.zeros_like(s), s)
    m = torch.where(flat, mn, m)
    return s, -m


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Pack 8 six-bit scales and 8 six-bit mins (nb, 8) into the 12-byte K-quant scale field (nb, 12)."""
    lo_s, hi_s = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = mn[:, :4], mn[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _quantize_qk_asym(blocks: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K core: blocks (nb, 256) fp32 → (d, dmin) fp16-rounded (nb,), sc, m (nb, 8) ints, q (nb, 256)."""
    nb = blocks.shape[0]
    sub = blocks.view(nb, 8, 32)
    av_x = torch.sqrt((blocks * blocks).sum(-1) / QK_K)  # (nb,)
    w = av_x[:, None, None] + sub.abs()
    scales, mins = _best_scale_min(sub.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, rdelta, nstep)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)
    max_scale = scales.max(-1).values
    max_min = mins.max(-1).values
    inv_s = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_m = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, 1.0), 0.0)
    ls = torch.round(inv_s[:, None] * scales).clamp_(0, 63).to(torch.int32)
    lm = torch.round(inv_m[:, None] * mins).clamp_(0, 63).to(torch.int32)
    d = _f16(max_scale / 63.0)
    dmin = _f16(max_min / 63.0)
    dd = (d[:, None] * ls)[:, :, None]  # (nb, 8, 1)
    dm = (dmin[:, None] * lm)[:, :, None]
    q = torch.where(dd > 0, torch.round((sub + dm) / torch.where(dd > 0, dd, 1.0)), 0.0).clamp_(0, nmax)
    return d, dmin, ls, lm, q.to(torch.int32).view(nb, QK_K)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(nb, 256) 4-bit values → (nb, 128): byte 32i+l holds sub-block 2i (low nibble) and 2i+1 (high)."""
    nb = q.shape[0]
    q = q.view(nb, 4, 2, 32)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128).to(torch.uint8)


def q4_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 → (nb, 144) uint8: d, dmin (fp16), 12 scale bytes, 128 nibble bytes."""
    d, dmin, ls, lm, q = _quantize_qk_asym(blocks, 15, -1.0, 0.1, 20)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(ls, lm), _pack_nibbles(q)], dim=1)


def q5_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 → (nb, 176) uint8: d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes."""
    d, dmin, ls, lm, q = _quantize_qk_asym(blocks, 31, -0.5, 0.1, 15)
    nb = q.shape[0]
    high = (q >> 4).view(nb, 8, 32)  # bit j of byte l = high bit of element l of sub-block j
    qh = (high << torch.arange(8, dtype=torch.int32)[None, :, None]).sum(1).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(ls, lm), qh, _pack_nibbles(q & 0xF)], dim=1)


def _best_scale_sym(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """x²-weighted symmetric scale search for sub-blocks x (N, n): x ≈ scale·q, q in [−nmax, nmax−1]."""
    amax_idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(1, amax_idx)  # (N, 1) signed value of largest magnitude
    tiny = mx.abs() < 1e-15
    mx = torch.where(tiny, torch.ones_like(mx), mx)
    steps = torch.tensor([0.0] + [0.1 * i for i in range(-9, 10) if i != 0])
    iscales = -(nmax + steps)[None, :] / mx  # (N, K)
    q = torch.round(iscales[:, :, None] * x[:, None, :]).clamp_(-nmax, nmax - 1)
    w = (x * x)[:, None, :]
    sumlx = (w * x[:, None, :] * q).sum(-1)
    suml2 = (w * q * q).sum(-1)
    good = suml2 > 0
    score = torch.where(good, sumlx * sumlx / torch.where(good, suml2, 1.0), torch.zeros_like(sumlx))
    best = score.argmax(dim=-1, keepdim=True)  # first maximum wins (reference: strict ">")
    s = (sumlx / torch.where(good, suml2, 1.0)).gather(1, best)[:, 0]
    s = torch.where(good.gather(1, best)[:, 0], s, torch.zeros_like(s))
    return torch.where(tiny[:, 0], torch.zeros_like(s), s)


def q6_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 → (nb, 210) uint8: 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, d (fp16)."""
    nb = blocks.shape[0]
    sub = blocks.view(nb, 16, 16)
    scales = _best_scale_sym(sub.reshape(-1, 16), 32).view(nb, 16)
    idx = scales.abs().argmax(dim=-1, keepdim=True)
    max_scale = scales.gather(1, idx)[:, 0]  # signed
    zero = max_scale.abs() < 1e-15
    iscale = torch.where(zero, 0.0, -128.0 / torch.where(zero, 1.0, max_scale))
    d = _f16(torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale)))
    ls = torch.round(iscale[:, None] * scales).clamp_(max=127).to(torch.int32)  # (nb, 16)
    dd = (d[:, None] * ls)[:, :, None]
    nz = dd != 0
    q = torch.where(nz, torch.round(sub / torch.where(nz, dd, 1.0)).clamp_(-32, 31), 0.0).to(torch.int32) + 32
    q = q.view(nb, QK_K)
    low, high = q & 0xF, q >> 4
    lo = low.view(nb, 2, 2, 64)
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    hi = high.view(nb, 2, 4, 32)
    qh = (hi << (2 * torch.arange(4, dtype=torch.int32))[None, None, :, None]).sum(2).reshape(nb, 64)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), ls.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], dim=1)


_BLOCK_FNS = {"Q4_K": q4_k_blocks, "Q5_K": q5_k_blocks, "Q6_K": q6_k_blocks}


def quantize_k(weight: torch.Tensor | np.ndarray, qtype: str) -> np.ndarray:
    """Quantize a 2-D (rows, cols) weight, cols a multiple of 256, to ``qtype`` bytes (rows, cols/256·type_size)."""
    fn = _BLOCK_FNS[qtype]
    w = torch.as_tensor(weight).to(torch.float32)
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{qtype}: row length {cols} is not a multiple of {QK_K}")
    blocks = w.reshape(-1, QK_K)
    step = max(1, _CHUNK_ELEMS // QK_K)
    out = [fn(blocks[i : i + step].contiguous()) for i in range(0, blocks.shape[0], step)]
    return torch.cat(out).reshape(rows, -1).numpy()
