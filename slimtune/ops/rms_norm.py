"""RMSNorm: y = w · x / sqrt(mean(x²) + eps), over the last dimension.

``rms_norm`` is the public op (one autograd Function, Triton or torch inside, see ``slimtune.ops.dispatch``).
The two ``*_ref`` functions are the readable ground truth that the torch backend runs and the tests compare to.
What the Function saves for backward: the inverse RMS per row (fp32) and either x (``save="input"``, the default)
or the output y (``save="output"``). With y, backward recovers x̂ = x·rstd = y / w, and since the next op (the
fused q/k/v projection, the fused MLP) saves y as its own input anyway, the norm then costs no activation memory
beyond rstd. ``save="output"`` needs a weight without zeros (x̂ is lost where w = 0); ``FusedRMSNorm`` checks.
"""

from __future__ import annotations

import torch


def rms_norm_forward_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, N), weight (N,) -> y (n, N) in promote(x, weight) dtype, rstd (n,) fp32. Math in fp32."""
    xf = x.float()  # (n, N)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)  # (n,)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = (xf * rstd[:, None] * weight.float()).to(out_dtype)  # (n, N)
    return y, rstd


def rms_norm_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    *,
    need_dw: bool,
    from_output: bool = False,
    dx_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of rms_norm_forward_ref. dy, x (n, N); rstd (n,) -> dx (n, N), dw (N,) or None.

    With x̂ = x·rstd and g = w·dy:  dx = rstd · (g − x̂ · mean(g · x̂)),  dw = Σ_rows dy · x̂.
    ``from_output``: the ``x`` argument holds the output y = x̂·w instead, and x̂ = y / w.
    dx is in ``dx_dtype`` (default: the dtype of the ``x`` argument).
    """
    r = rstd[:, None]  # (n, 1)
    if from_output:
        w = weight.float()
        xhat = torch.where(w != 0, x.float() / w, 0.0)  # (n, N)
    else:
        xhat = x.float() * r  # (n, N)
    g = dy.float() * weight.float()  # (n, N)
    c = (g * xhat).mean(dim=-1, keepdim=True)  # (n, 1)
    dx = (r * (g - xhat * c)).to(dx_dtype or x.dtype)
    dw = (dy.float() * xhat).sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    save: str = "input",
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm of x (..., N) with weight (N,) (trainable or frozen). Returns (..., N) in promote(x, weight) dtype.

    ``save="output"`` keeps y instead of x for backward (see the module docstring; the weight must have no zeros).
    """
    from slimtune.kernels.rms_norm import RMSNormFunction

    if save not in ("input", "output"):
        raise ValueError(f"rms_norm: save must be 'input' or 'output', not {save!r}")
    return RMSNormFunction.apply(x, weight, float(eps), save == "output", backend)
