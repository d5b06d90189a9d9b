"""RMSNorm: Triton kernel (interpreter) and torch reference vs an fp64 ground truth; forward and both gradients."""

import importlib
import zlib

import pytest
import torch
from kernel_helpers import rel as _rel

from slimtune.kernels.rms_norm import rms_norm_backward_triton, rms_norm_forward_triton
from slimtune.ops.rms_norm import (
    TORCH_PRIMITIVES,
    RMSNormFunction,
    rms_norm,
    rms_norm_backward_ref,
    rms_norm_forward_ref,
)


def _truth(x, w, eps, dy, offset=0.0):
    """Autograd through the textbook formula in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (offset + w64)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape,save", [((37, 200), "input"), ((37, 200), "output"), ((2, 5, 64), "output"),
                                        ((1, 8), "input")])
def test_rms_norm_matches_fp64(backend, dtype, tol, shape, save, poisoned):
    g = torch.Generator().manual_seed(zlib.crc32(f"{backend}{dtype}{shape}{save}".encode()))
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    y = rms_norm(x, w, eps=1e-5, save=save, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    ty, tdx, tdw = _truth(x, w, 1e-5, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    for got, ref in ((y, ty), (dx, tdx), (dw, tdw)):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) < tol


def test_rms_norm_frozen_weight_and_fp32_weight_promotes():
    x = torch.randn(3, 7, 48, dtype=torch.float16, requires_grad=True)
    w = torch.rand(48) + 0.5  # fp32, frozen (as prepare-for-kbit leaves norms)
    for backend in ("torch", "triton"):
        y = rms_norm(x, w, eps=1e-6, backend=backend)
        assert y.dtype == torch.float32  # same promotion as HF's weight * hidden.to(input_dtype)
        (dx,) = torch.autograd.grad(y.sum(), (x,))
        assert dx.dtype == torch.float16 and torch.isfinite(dx).all()


def test_triton_launchers_write_every_output(poisoned):
    """Outputs poisoned (NaN) before the launch must be fully overwritten."""
    n, N = 37, 200
    x = torch.randn(n, N) + 0.1
    w = torch.randn(N)
    dy = torch.randn(n, N)
    y_ref, r_ref = rms_norm_forward_ref(x, w, 1e-6)
    y, r = rms_norm_forward_triton(x, w, 1e-6)
    assert _rel(y, y_ref) < 1e-6 and _rel(r, r_ref) < 1e-6
    dx_ref, dw_ref = rms_norm_backward_ref(dy, x, w, r_ref, need_dw=True)
    dx, dw = rms_norm_backward_triton(dy, x, w, r_ref, need_dw=True)
    assert torch.isfinite(dx).all() and _rel(dx, dx_ref) < 1e-5 and _rel(dw, dw_ref) < 1e-5
    dx2, dw2 = rms_norm_backward_triton(dy, x, w, r_ref, need_dw=False)
    assert dw2 is None and _rel(dx2, dx_ref) < 1e-5
    dx3, dw3 = rms_norm_backward_triton(dy, y_ref, w, r_ref, need_dw=True, from_output=True)
    assert _rel(dx3, dx_ref) < 1e-5 and _rel(dw3, dw_ref) < 1e-5


@pytest.mark.parametrize("save_output", [False, True])
def test_saves_rstd_and_x_or_y_only(save_output):
    x = torch.randn(37, 200, requires_grad=True)
    w = torch.randn(200, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = RMSNormFunction.apply(x, w, 1e-6, 0.0, save_output, TORCH_PRIMITIVES)
    shapes = sorted(tuple(t.shape) for t in packed)
    assert shapes == [(37,), (37, 200), (200,)]  # x or y, rstd, and the weight (a parameter)
    kept = next(t for t in packed if t.shape == (37, 200))
    assert kept.untyped_storage().data_ptr() == (y if save_output else x).untyped_storage().data_ptr()


def test_non_contiguous_input():
    x = torch.randn(200, 37).t().requires_grad_()  # (37, 200), column stride != 1
    w = torch.randn(200)
    a = rms_norm(x, w, backend="triton")
    b = rms_norm(x.detach().contiguous(), w, backend="torch")
    assert _rel(a, b) < 1e-6


# ---------------------------------------------------------------------------------------- offset (Gemma) and q/k norms


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("save", ["input", "output"])
def test_offset_matches_fp64(backend, dtype, tol, save, poisoned):
    g = torch.Generator().manual_seed(zlib.crc32(f"off{backend}{dtype}{save}".encode()))
    x = (torch.randn(3, 13, 72, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(72, generator=g) * 0.3).to(dtype).requires_grad_()  # Gemma weights sit around 0: (1 + w)
    dy = torch.randn(3, 13, 72, generator=g).to(dtype)
    y = rms_norm(x, w, eps=1e-6, save=save, backend=backend, offset=1.0)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    ty, tdx, tdw = _truth(x, w, 1e-6, dy, offset=1.0)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    for got, ref in ((y, ty), (dx, tdx), (dw, tdw)):
        assert _rel(got, ref) < tol


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_offset_matches_hf_gemma_norm(family, backend):
    """HF's Gemma RMSNorm (fp32 math, cast last; a bf16 input with an fp32 weight stays bf16): same values, and
    the same gradients as autograd through HF's module."""
    if family == "gemma2":
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as Norm
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    g = torch.Generator().manual_seed(7)
    hf = Norm(40, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(40, generator=g) * 0.5)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = (torch.randn(2, 9, 40, generator=g) * 3).to(dtype).requires_grad_()
        dy = torch.randn(2, 9, 40, generator=g).to(dtype)
        want = hf(x)
        wdx, wdw = torch.autograd.grad(want, (x, hf.weight), dy)
        got = rms_norm(x, hf.weight, eps=1e-6, backend=backend, offset=1.0)
        gdx, gdw = torch.autograd.grad(got, (x, hf.weight), dy)
        assert got.dtype == want.dtype == dtype
        if backend == "torch":  # same fp32 op order as HF: bit-identical forward
            assert torch.equal(got, want)
        assert _rel(got, want) < tol and _rel(gdx, wdx) < tol and _rel(gdw, wdw) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qk_norm_on_head_views_matches_hf_qwen3(backend):
    """Qwen3's q/k norm: RMSNorm over head_dim of a (B, T, heads, head_dim) view of the q projection output."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    g = torch.Generator().manual_seed(11)
    B, T, Hq, Hk, D = 2, 7, 3, 1, 24
    hf = Qwen3RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(D, generator=g) + 0.5)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, generator=g, requires_grad=True)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)  # strided (row stride (Hq + 2Hk)·D)
    dy = torch.randn(B, T, Hq, D, generator=g)
    want = hf(q)
    wq, ww = torch.autograd.grad(want, (qkv, hf.weight), dy)
    got = rms_norm(q, hf.weight, eps=1e-6, backend=backend)
    gq, gw = torch.autograd.grad(got, (qkv, hf.weight), dy)
    assert got.shape == (B, T, Hq, D)
    assert _rel(got, want) < 1e-6 and _rel(gq, wq) < 1e-5 and _rel(gw, ww) < 1e-5
    assert (gq[..., Hq * D :] == 0).all()


def test_torch_backend_never_imports_triton_kernels(monkeypatch):
    ops_rms = importlib.import_module("slimtune.ops.rms_norm")  # the module (the package re-exports the function)
    monkeypatch.setattr(ops_rms, "triton_module", lambda name: (_ for _ in ()).throw(AssertionError(name)))
    x = torch.randn(5, 16, requires_grad=True)
    rms_norm(x, torch.rand(16) + 0.5, backend="torch", offset=1.0).sum().backward()
    assert x.grad is not None
