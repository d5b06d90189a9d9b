"""QLoRA linear: y = X Wᵀ + s·(X Aᵀ Mᵀ) Bᵀ + bias, optionally with a DoRA per-output scale.

Shapes (PEFT conventions): x (T, in), W (out, in) frozen (NF4 or dense), A (r, in), M (r, r) optional (three-matrix
adapters B·M·A: LaMDA's S, SLoRA/NLoRA/IntTune's N), B (out, r), magnitude m (out,) optional (DoRA), bias (out,).

    z = X Wᵀ + s · ((X Aᵀ) Mᵀ) Bᵀ                          (T, out)
    y = z + bias                                          plain LoRA
    y = (m / n) ⊙ z + bias,   n = ‖W + s·B M A‖_row        DoRA (n detached; bias not scaled), i.e.
      = base(x) + (m/n − 1)·(W x) + (m/n)·s·B M A x        (DESIGN §2)

This module holds the public op (`lora_linear`), the description of one projection (`LoRAProjection`, also used by
the fused MLP and q/k/v ops), the readable differentiable formula (`lora_linear_reference`: the ground truth in
tests), and the plain-torch pieces that the autograd Function in slimtune/kernels/qlora_linear.py runs on the torch
backend. The Triton launchers there have the same names and signatures:

    base_matmul(x, base, ...)      (x Wᵀ + s·L R)·out_scale + bias        forward; L R = the LoRA term
    base_matmul_t(dy, base, ...)   (dy·out_scale) W + L R                  dX in backward
    base_dmag(x, dy, base, ...)    Σ_t dy ⊙ (x Wᵀ + s·L R)                 DoRA magnitude gradient (× 1/n)
    base_row_norm_sq(base)         ‖W_o‖² per output row                   DoRA norm
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.errors import ModelError
from slimtune.ops.nf4 import NF4Weight, as_nf4_weight, dense_weight

__all__ = [
    "LoRAProjection",
    "lora_linear",
    "lora_projection",
    "lora_linear_reference",
    "dora_weight_norm",
    "dropout_mask",
    "base_matmul",
    "base_matmul_t",
    "base_dmag",
    "base_row_norm_sq",
]

Base = NF4Weight | torch.Tensor


@dataclass(frozen=True, eq=False)
class LoRAProjection:
    """One adapted projection: a frozen base (+ bias) and its adapter factors (any of which may be frozen).

    `base` may be an `NF4Weight`, a dense (out, in) tensor, a bitsandbytes `Params4bit`, or a module with `.weight`;
    it is normalised to `NF4Weight | Tensor`. Without `lora_A`/`lora_B` the projection is the base alone.
    `base_norm_sq` is an optional cached ‖W_o‖² (fp32, (out,)) for DoRA: the base is frozen, so the caller may
    compute it once with `base_row_norm_sq` instead of on every forward. `dropout` is the LoRA dropout probability
    on the adapter's input (pass 0 in eval mode); the mask is drawn from a seed and regenerated in backward, so it
    costs no saved memory. As in DESIGN §2, DoRA's base term uses x and only B A sees drop(x).
    """

    base: Base
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None  # (r, in)
    lora_B: torch.Tensor | None = None  # (out, r)
    scale: float = 1.0
    lora_M: torch.Tensor | None = None  # (r, r)
    magnitude: torch.Tensor | None = None  # (out,)
    base_norm_sq: torch.Tensor | None = None  # (out,) fp32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", as_nf4_weight(self.base))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "dropout", float(self.dropout))
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"LoRAProjection: dropout must be in [0, 1), got {self.dropout}")
        out_f, in_f = self.shape
        if (self.lora_A is None) != (self.lora_B is None):
            raise ModelError("LoRAProjection: lora_A and lora_B must be given together")
        if self.lora_A is not None:
            r = self.lora_A.shape[0]
            if tuple(self.lora_A.shape) != (r, in_f) or tuple(self.lora_B.shape) != (out_f, r):
                raise ModelError(
                    f"LoRAProjection: base is {out_f}x{in_f} but lora_A is {tuple(self.lora_A.shape)} and lora_B is "
                    f"{tuple(self.lora_B.shape)} (expected (r, {in_f}) and ({out_f}, r))"
                )
            if self.lora_M is not None and tuple(self.lora_M.shape) != (r, r):
                raise ModelError(f"LoRAProjection: lora_M must be ({r}, {r}), got {tuple(self.lora_M.shape)}")
        elif self.lora_M is not None:
            raise ModelError("LoRAProjection: lora_M needs lora_A and lora_B")
        for name in ("magnitude", "bias", "base_norm_sq"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (out_f,):
                raise ModelError(f"LoRAProjection: {name} must be ({out_f},), got {tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        b = self.base
        return b.shape if isinstance(b, NF4Weight) else (b.shape[0], b.shape[1])

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.shape[0]

    def factors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors that may receive gradients, in the order the autograd Functions take them."""
        return (self.lora_A, self.lora_B, self.lora_M, self.magnitude, self.bias)


# ----------------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------------


def lora_projection(x: torch.Tensor, proj: LoRAProjection, *, backend: str | None = None) -> torch.Tensor:
    """Apply one `LoRAProjection` to x (..., in) -> (..., out) through the fused autograd Function."""
    from slimtune.kernels.qlora_linear import qlora_linear  # the Function (kernels import this module)
    from slimtune.ops.dispatch import resolve_backend

    lead = x.shape[:-1]
    y = qlora_linear(x.reshape(-1, x.shape[-1]), proj=proj, backend=resolve_backend(x, backend))
    return y.reshape(*lead, y.shape[-1])


def lora_linear(
    x: torch.Tensor,
    *,
    base: Base,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    lora_M: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
    base_norm_sq: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """y = X Wᵀ + s·(X Aᵀ Mᵀ) Bᵀ (+ DoRA scale) + bias for x (..., in); saves only X (and the (T, r) X Aᵀ)."""
    proj = LoRAProjection(
        base=base, bias=bias, lora_A=lora_A, lora_B=lora_B, scale=scale, lora_M=lora_M, magnitude=magnitude,
        base_norm_sq=base_norm_sq, dropout=dropout,
    )
    return lora_projection(x, proj, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# the formula, differentiable (ground truth for tests; materialises W)
# ----------------------------------------------------------------------------------------------------------------


def dora_weight_norm(
    w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, lora_M: torch.Tensor | None = None
) -> torch.Tensor:
    """n = ‖W + s·B M A‖ per output row, detached (DoRA)."""
    with torch.no_grad():
        a = lora_A if lora_M is None else lora_M @ lora_A
        return torch.linalg.vector_norm(w + scale * (lora_B @ a), dim=1)


def dropout_mask(
    shape: tuple[int, ...], p: float, seed: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The LoRA dropout mask for `seed`: 0 or 1/(1 − p), drawn by a private generator (same in forward/backward)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    mask = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)
    return mask.mul_(1.0 / (1.0 - p))


def lora_linear_reference(
    x: torch.Tensor,
    proj: LoRAProjection,
    *,
    dtype: torch.dtype | None = None,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive formula in plain autograd, everything cast to `dtype` (default x.dtype); W is dequantized.

    `lora_input` replaces x in the adapter branch (drop(x) when checking dropout); `proj.dropout` is ignored.
    """
    dt = dtype or x.dtype
    cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
    x = x.to(dt)
    w = dense_weight(proj.base, dt)
    z = x @ w.T
    if proj.has_lora:
        a, b, m = cast(proj.lora_A), cast(proj.lora_B), cast(proj.lora_M)
        xa = (x if lora_input is None else lora_input.to(dt)) @ a.T
        if m is not None:
            xa = xa @ m.T
        z = z + proj.scale * (xa @ b.T)
        if proj.magnitude is not None:
            z = z * (cast(proj.magnitude) / dora_weight_norm(w, a, b, proj.scale, m))
    elif proj.magnitude is not None:
        z = z * (cast(proj.magnitude) / torch.linalg.vector_norm(w, dim=1))
    if proj.bias is not None:
        z = z + cast(proj.bias)
    return z


# ----------------------------------------------------------------------------------------------------------------
# plain-torch pieces the Function runs on the torch backend (x and dy are 2-D; results in x's dtype)
# ----------------------------------------------------------------------------------------------------------------


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
    """(x Wᵀ + lora_scale · lora_left @ lora_right) · out_scale + bias.

    x (T, in); lora_left (T, r); lora_right (r, out); out_scale, bias (out,) -> (T, out) in x's dtype.
    """
    y = x @ dense_weight(base, x.dtype).T
    if lora_left is not None:
        y += lora_scale * (lora_left @ lora_right.to(x.dtype))
    if out_scale is not None:
        y = (y.float() * out_scale).to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    if out is not None:
        return out.copy_(y)
    return y


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
    """(dy · out_scale) @ W + lora_left @ lora_right, added to `out` when `accumulate`.

    dy (T, out); out_scale (out,); lora_left (T, r); lora_right (r, in) -> (T, in) in dy's dtype.
    """
    if out_scale is not None:
        dy = (dy.float() * out_scale).to(dy.dtype)
    dx = dy @ dense_weight(base, dy.dtype)
    if lora_left is not None:
        dx += lora_left @ lora_right.to(dy.dtype)
    if out is None:
        return dx
    return out.add_(dx) if accumulate else out.copy_(dx)


def base_dmag(
    x: torch.Tensor,
    dy: torch.Tensor,
    base: Base,
    *,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Σ_t dy ⊙ (x Wᵀ + lora_scale · lora_left @ lora_right): fp32 (out,). The recomputed z never leaves here."""
    z = base_matmul(x, base, lora_left=lora_left, lora_right=lora_right, lora_scale=lora_scale)
    return (dy.float() * z.float()).sum(0)


def base_row_norm_sq(base: Base) -> torch.Tensor:
    """‖W_o‖² per output row, fp32 (out,)."""
    return dense_weight(base, torch.float32).square().sum(1)
