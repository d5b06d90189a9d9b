"""Chunked linear cross-entropy vs F.cross_entropy on full logits (fp64 truth); loss and every gradient."""

import zlib

import pytest
import torch
from kernel_helpers import rel as _rel
import torch.nn.functional as F

from slimtune.kernels.linear_ce import LinearCrossEntropyFunction, ce_rows_triton
from slimtune.ops.linear_ce import ce_rows_ref, linear_cross_entropy


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
        LinearCrossEntropyFunction.apply(x, w, None, t, None, -100, "mean", 8, True, "torch")
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
