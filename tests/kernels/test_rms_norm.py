"""RMSNorm: Triton kernel (interpreter) and torch reference vs an fp64 ground truth; forward and both gradients."""

import zlib

import pytest
import torch
from kernel_helpers import rel as _rel

from slimtune.kernels.rms_norm import RMSNormFunction, rms_norm_backward_triton, rms_norm_forward_triton
from slimtune.ops.rms_norm import rms_norm, rms_norm_backward_ref, rms_norm_forward_ref


def _truth(x, w, eps, dy):
    """Autograd through the textbook formula in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
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
        y = RMSNormFunction.apply(x, w, 1e-6, save_output, "torch")
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
