"""Chunked linear cross-entropy vs F.cross_entropy on full logits (fp64 truth); loss and every gradient; the
softcap; the streamed NF4 head against the dense head on the same dequantized weights, and its peak memory."""

import importlib
import weakref
import zlib

import pytest
import torch
from kernel_helpers import rel as _rel
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.kernels.linear_ce import ce_block_grad_triton, ce_block_stats_triton, ce_rows_triton
from slimtune.ops.linear_ce import (
    TORCH_PRIMITIVES,
    LinearCrossEntropyFunction,
    ce_block_grad_ref,
    ce_block_stats_ref,
    ce_rows_ref,
    linear_cross_entropy,
)
from slimtune.errors import ModelError
from slimtune.ops.nf4 import dense_weight, quantize_4bit


def _case(T=37, H=200, V=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.randperm(T, generator=g)[: T // 4]] = -100
    return x, w, b, t


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_linear_ce_all_grads(backend, reduction, dtype, tol, poisoned):
    x, w, b, t = _case(seed=zlib.crc32(f"{backend}{reduction}{dtype}".encode()))
    xd, wd, bd = (v.to(dtype).requires_grad_() for v in (x, w, b))
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (xd, wd, bd))
    ref = F.cross_entropy(F.linear(x64, w64, b64), t, reduction=reduction)
    rg = torch.autograd.grad(ref * 1.5, (x64, w64, b64))
    loss = linear_cross_entropy(xd, wd, t, bias=bd, reduction=reduction, chunk_size=8, backend=backend)
    got = torch.autograd.grad(loss * 1.5, (xd, wd, bd))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) / abs(ref.item()) < tol
    for a, r in zip(got, rg):
        assert torch.isfinite(a).all() and _rel(a, r) < tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_3d_input_and_normalizer(backend, poisoned):
    x, w, _, t = _case(T=2 * 19, H=40, V=97, seed=3)
    x3 = x.view(2, 19, 40).requires_grad_()
    t3 = t.view(2, 19)
    loss = linear_cross_entropy(x3, w, t3, reduction="sum", normalizer=7.0, backend=backend)  # default chunking
    x64 = x3.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(x64, w.double()).view(-1, 97), t, reduction="sum") / 7.0
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-5
    (gx,) = torch.autograd.grad(loss, (x3,))
    (rx,) = torch.autograd.grad(ref, (x64,))
    assert gx.shape == x3.shape and _rel(gx, rx) < 1e-5


def test_saves_dx_only_for_frozen_head():
    x, w, _, t = _case(T=37, H=48, V=50)
    x.requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: packed.append(v) or v, lambda v: v):
        opts = dict(ignore_index=-100, reduction="mean", chunk_size=8, compute_grad=True, softcap=None, block=None)
        LinearCrossEntropyFunction.apply(x, w, None, t, None, opts, TORCH_PRIMITIVES)
    assert sorted(tuple(p.shape) for p in packed) == [(), (37, 48)]  # dx and the mean factor; no logits


def test_all_ignored_gives_zero_not_nan():
    x, w, _, t = _case(T=9, H=16, V=20)
    x.requires_grad_()
    t[:] = -100
    for backend in ("torch", "triton"):
        loss = linear_cross_entropy(x, w, t, backend=backend)
        (gx,) = torch.autograd.grad(loss, (x,))
        assert loss.item() == 0.0 and (gx == 0).all()


def test_no_grad_forward_only():
    x, w, _, t = _case(T=11, H=16, V=40)
    with torch.no_grad():
        a = linear_cross_entropy(x, w, t, backend="triton")
    assert abs(a.item() - F.cross_entropy(x @ w.t(), t).item()) < 1e-5


def test_row_kernel_matches_reference_on_poisoned_outputs(poisoned):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(13, 2500, generator=g) * 4  # V > one block: the online logsumexp loops
    t = torch.randint(0, 2500, (13,), generator=g)
    t[3] = -100
    a, b = logits.clone(), logits.clone()
    la = ce_rows_ref(a, t, ignore_index=-100, grad=True)
    lb = ce_rows_triton(b, t, ignore_index=-100, grad=True)
    assert _rel(lb, la) < 1e-6 and _rel(b, a) < 1e-5 and (b[3] == 0).all()
    c = logits.clone()
    lc = ce_rows_triton(c, t, ignore_index=-100, grad=False)
    assert torch.equal(c, logits) and _rel(lc, la) < 1e-6


# ---------------------------------------------------------------------------------------------------- softcap


def _capped_truth(x, w, b, t, cap, reduction="mean"):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = F.linear(x64, w64, b64)
    loss = F.cross_entropy(cap * torch.tanh(z / cap), t, reduction=reduction)
    return loss, x64, w64, b64


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_softcap_all_grads(backend, dtype, tol, poisoned):
    x, w, b, t = _case(T=29, H=48, V=173, seed=zlib.crc32(f"cap{backend}{dtype}".encode()))
    x, w = x * 2, w * 3  # logits of a few tens: the cap (s = 5) bends them
    xd, wd, bd = (v.to(dtype).requires_grad_() for v in (x, w, b))
    ref, x64, w64, b64 = _capped_truth(xd, wd, bd, t, 5.0)
    rg = torch.autograd.grad(ref, (x64, w64, b64))
    loss = linear_cross_entropy(xd, wd, t, bias=bd, chunk_size=8, backend=backend, softcap=5.0)
    got = torch.autograd.grad(loss, (xd, wd, bd))
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < tol
    uncapped = linear_cross_entropy(xd.detach(), wd.detach(), t, bias=bd.detach(), backend=backend)
    assert abs(uncapped.item() - loss.item()) > 0.1  # the cap really changed the loss
    for a, r in zip(got, rg):
        assert _rel(a, r) < tol


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_row_and_block_kernels_match_reference_on_poisoned_outputs(softcap, poisoned):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(11, 2300, generator=g) * 4  # V > one block: the online logsumexp loops
    t = torch.randint(0, 2300, (11,), generator=g)
    t[2] = -100
    a, b = logits.clone(), logits.clone()
    la = ce_rows_ref(a, t, ignore_index=-100, grad=True, softcap=softcap)
    lb = ce_rows_triton(b, t, ignore_index=-100, grad=True, softcap=softcap)
    assert _rel(lb, la) < 1e-6 and _rel(b, a) < 1e-5 and (b[2] == 0).all()
    # the same rows as vocabulary blocks [0, 700), [700, 1400), [1400, 2100), [2100, 2300)
    for stats, grad in ((ce_block_stats_ref, ce_block_grad_ref), (ce_block_stats_triton, ce_block_grad_triton)):
        m = torch.full((11,), float("-inf"))
        s, zt = torch.zeros(11), torch.zeros(11)
        blocks = [(v0, min(2300, v0 + 700)) for v0 in range(0, 2300, 700)]
        for v0, v1 in blocks:
            stats(logits[:, v0:v1].clone(), t, m, s, zt, v0=v0, softcap=softcap)
        lse = m + s.log()
        assert _rel(torch.where(t != -100, lse - zt, 0.0), la) < 1e-6
        d = logits.clone()
        for v0, v1 in blocks:
            blk = d[:, v0:v1].clone()
            grad(blk, t, lse, v0=v0, ignore_index=-100, softcap=softcap)
            d[:, v0:v1] = blk
        assert _rel(d, a) < 1e-5


# ------------------------------------------------------------------------------------------ streamed NF4 head


def _nf4_case(T, H, V, seed, nested):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = quantize_4bit(torch.randn(V, H, generator=g) * 0.3, double_quant=nested)
    b = torch.randn(V, generator=g) * 0.5
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.randperm(T, generator=g)[: T // 5]] = -100
    return x, w, b, t


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 5e-3)])
@pytest.mark.parametrize("nested,H,block", [(False, 40, 96), (True, 64, 256)])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_streamed_nf4_head_matches_dense_head(backend, dtype, tol, nested, H, block, softcap, poisoned):
    """Loss, dX and dbias of the streamed NF4 head == the dense head holding the same dequantized weights.
    V = 601 is no multiple of the block (a short last block); T = 23 is odd and chunked in 7s."""
    x, w, b, t = _nf4_case(23, H, 601, zlib.crc32(f"{backend}{dtype}{nested}{softcap}".encode()), nested)
    x, b = x.to(dtype), b.to(dtype)
    dense = w.dequantize(dtype)
    args = dict(chunk_size=7, backend=backend, softcap=softcap, reduction="sum", normalizer=5.0)
    x1, b1 = x.clone().requires_grad_(), b.clone().requires_grad_()
    got = linear_cross_entropy(x1, w, t, bias=b1, vocab_block=block, **args)
    x2, b2 = x.clone().requires_grad_(), b.clone().requires_grad_()
    want = linear_cross_entropy(x2, dense, t, bias=b2, **args)
    (got * 1.7).backward()
    (want * 1.7).backward()
    assert abs(got.item() - want.item()) / abs(want.item()) < tol
    assert _rel(x1.grad, x2.grad) < tol and _rel(b1.grad, b2.grad) < tol
    if dtype == torch.float32:  # and both equal the fp64 truth on the dequantized weights
        z = F.linear(x.double(), dense.double(), b.double())
        z = z if softcap is None else softcap * torch.tanh(z / softcap)
        ref = F.cross_entropy(z, t, reduction="sum") / 5.0
        assert abs(got.item() - ref.item()) / abs(ref.item()) < 1e-5


def test_streamed_block_size_rounds_to_whole_quant_blocks():
    from slimtune.ops.linear_ce import stream_chunk_size, vocab_block_rows

    _, w, _, _ = _nf4_case(3, 200, 5000, 1, True)  # 200 columns, double quant: rows start at multiples of 2048
    assert w.row_unit() == 2048 and vocab_block_rows(w, torch.float32, 3000) == 2048
    assert vocab_block_rows(w, torch.float32, 100) == 2048  # at least one unit
    _, w, _, _ = _nf4_case(3, 4096, 300, 1, True)  # Llama-3.1-8B's hidden size: 4-row units
    assert w.row_unit() == 4 and vocab_block_rows(w, torch.bfloat16) == 300  # whole (small) head
    assert vocab_block_rows(w, torch.bfloat16, 130) == 128
    assert stream_chunk_size(131072, 4096) == 4096 and stream_chunk_size(23, 4096) == 32  # bounded at 128k tokens


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("H", [64, 200])  # 200: rows straddle quant blocks (readable dequant), 64: bitsandbytes'
def test_head_blocks_are_exact_row_slices(nested, H):
    _, w, _, _ = _nf4_case(3, H, 4500, 6, nested)
    full, unit = w.dequantize(torch.float32), w.row_unit()
    for v0 in range(0, 4500, 3 * unit):
        v1 = min(4500, v0 + 3 * unit)
        assert torch.equal(dense_weight(w.rows(v0, v1), torch.float32), full[v0:v1])
    if unit > 1:
        with pytest.raises(ModelError, match="multiple"):
            w.rows(1, 2)


def test_streamed_all_ignored_and_no_grad():
    x, w, _, t = _nf4_case(9, 64, 300, 2, False)
    x.requires_grad_()
    t[:] = -100
    loss = linear_cross_entropy(x, w, t, vocab_block=64, backend="torch")
    (gx,) = torch.autograd.grad(loss, (x,))
    assert loss.item() == 0.0 and (gx == 0).all()
    x2, w2, _, t2 = _nf4_case(9, 64, 300, 3, False)
    with torch.no_grad():
        a = linear_cross_entropy(x2, w2, t2, vocab_block=64, backend="triton")
    assert abs(a.item() - F.cross_entropy(x2 @ w2.dequantize(torch.float32).t(), t2).item()) < 1e-5


class _LiveBytes(TorchDispatchMode):
    """Storage accounting: bytes of the tensors created inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.largest = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view:  # views and in-place results allocate nothing
                key = t.untyped_storage().data_ptr()
                if key not in inputs and key not in self.live and t.untyped_storage().nbytes():
                    self.live[key] = t.untyped_storage().nbytes()
                    weakref.finalize(t, self.live.pop, key, None)
                    self.largest = max(self.largest, self.live[key])
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def test_streamed_head_holds_one_block_not_the_whole_head():
    """Peak bytes alive during loss + backward: one dequantized block (plus chunk-sized buffers), where the dense
    path on the same NF4 head holds the whole dequantized (V, H) head."""
    T, H, V, block, chunk = 17, 64, 2999, 256, 8  # fp32 head 768 KB, block 64 KB, logits chunk 8 KB, x 4 KB
    x, w, _, t = _nf4_case(T, H, V, 4, True)
    x.requires_grad_()
    block_bytes, head_bytes = block * H * 4, V * H * 4
    with _LiveBytes() as streamed:
        loss = linear_cross_entropy(x, w, t, vocab_block=block, chunk_size=chunk, backend="torch")
        loss.backward()
    # one block + the chunk's logits and the torch reference's elementwise temporaries of that size + (c, H)
    # accumulators + dx and x.grad + (T,) row buffers
    budget = block_bytes + 4 * chunk * block * 4 + 3 * chunk * H * 4 + 2 * T * H * 4 + 64 * T
    assert streamed.largest == block_bytes  # the largest tensor ever made is one (block, H) weight block
    assert streamed.peak <= budget < head_bytes / 5, (streamed.peak, budget)
    with _LiveBytes() as dense:  # the measurement sees the whole head when it exists
        linear_cross_entropy(x, w.dequantize(torch.float32), t, chunk_size=chunk, backend="torch").backward()
    assert dense.peak >= head_bytes


def test_stream_buffer_bytes_is_what_the_default_chunks_hold(monkeypatch):
    """The estimator's formula (stream_buffer_bytes) against the storage accounting of a real call with the default
    block and chunk (module constants shrunk so 37 tokens make 3 chunks and a 1100-row head 5 blocks)."""
    lc = importlib.import_module("slimtune.ops.linear_ce")
    T, H, V = 37, 64, 1100
    monkeypatch.setattr(lc, "VOCAB_BLOCK_BYTES", 256 * H * 4)
    monkeypatch.setattr(lc, "STREAM_ACC_BYTES", 16 * H * 4)
    x, w, _, t = _nf4_case(T, H, V, 5, True)
    x.requires_grad_()
    with _LiveBytes() as live:
        linear_cross_entropy(x, w, t, backend="triton").backward()  # Triton rows kernels: no torch temporaries
    formula = lc.stream_buffer_bytes(T, H, V, 4, row_unit=w.row_unit())
    held = 2 * T * H * 4 + 32 * T  # dx (saved) and x.grad, (T,) row buffers
    assert live.largest == 256 * H * 4
    assert 0.8 * (formula + held) <= live.peak <= formula + held, (live.peak, formula, held)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_streamed_nf4_head_bf16_gpu(softcap):
    x, w, b, t = _nf4_case(1000, 256, 5003, 7, True)
    x = x.cuda().bfloat16()
    w = quantize_4bit(w.dequantize(torch.float32).cuda(), double_quant=True)
    t = t.cuda()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = linear_cross_entropy(x1, w, t, vocab_block=1024, softcap=softcap)
    want = linear_cross_entropy(x2, w.dequantize(torch.bfloat16), t, softcap=softcap)
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) / abs(want.item()) < 1e-2 and _rel(x1.grad, x2.grad) < 2e-2
