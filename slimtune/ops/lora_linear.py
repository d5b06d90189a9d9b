"""QLoRA linear: y = X Wᵀ + s·(X Aᵀ Mᵀ) Bᵀ + bias, optionally with a DoRA per-output scale.

Shapes (PEFT conventions): x (T, in), W (out, in) frozen (NF4 or dense), A (r, in), M (r, r) optional (three-matrix
adapters B·M·A: LaMDA's S, SLoRA/NLoRA/IntTune's N), B (out, r), magnitude m (out,) optional (DoRA), bias (out,).

    z = X Wᵀ + s · ((X Aᵀ) Mᵀ) Bᵀ                          (T, out)
    y = z + bias                                          plain LoRA
    y = (m / n) ⊙ z + bias,   n = ‖W + s·B M A‖_row        DoRA (n detached; bias not scaled), i.e.
      = base(x) + (m/n − 1)·(W x) + (m/n)·s·B M A x        (DESIGN §2)

This module holds the public op (`lora_linear`), the description of one projection (`LoRAProjection`, also used by
the fused MLP and q/k/v ops), the readable differentiable formula (`lora_linear_reference`: the ground truth in
tests), the math of one projection's forward/backward on any backend (`projection_forward` / `projection_backward`
/ `projection_grad_input`: the MLP and q/k/v Functions are built from them) and the one memory-saving autograd
Function. The Function touches W only through four primitives (`base_matmul`, `base_matmul_t`, `base_dmag`,
`base_row_norm_sq`) that each backend provides with the same signatures (`backend_ops`):

    "torch"    slimtune/ops/gemm_torch.py           readable reference: a fresh dequantized W per call
    "dequant"  slimtune/ops/gemm_dequant.py         W dequantized into one reused buffer + cuBLAS, in-place LoRA
    "triton"   slimtune/kernels/qlora_linear.py     one Triton GEMM, W dequantized in registers (small M)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from slimtune.errors import ModelError, SlimtuneError
from slimtune.ops import gemm_dequant, gemm_torch
from slimtune.ops.autotune import autograd_trial, shape_bucket
from slimtune.ops.dispatch import GEMM_BACKENDS, resolve_backend, triton_module
from slimtune.ops.generation import weights_generation
from slimtune.ops.gemm_torch import base_dmag, base_matmul, base_matmul_t, base_row_norm_sq
from slimtune.ops.nf4 import NF4Weight, as_nf4_weight, dense_weight

__all__ = [
    "LoRAProjection",
    "lora_linear",
    "lora_projection",
    "lora_linear_reference",
    "gemm_shape_class",
    "dora_weight_norm",
    "dropout_mask",
    "base_matmul",
    "base_matmul_t",
    "base_dmag",
    "base_row_norm_sq",
    "backend_ops",
    "dora_norm",
    "dropout_seed",
    "projection_forward",
    "projection_backward",
    "projection_grad_input",
    "factor_needs",
    "saved_for",
    "QLoRALinearFunction",
    "qlora_linear",
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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    b = resolve_backend(
        x, backend, op="lora_linear", shape_class=gemm_shape_class(x2, (proj,)), choices=GEMM_BACKENDS,
        trial=autograd_trial(lambda b, x, *f: qlora_linear(x, proj=_with(proj, f), backend=b), (x2, *proj.factors()),
                             rows=1),
    )
    y = qlora_linear(x2, proj=proj, backend=b)
    return y.reshape(*lead, y.shape[-1])


def gemm_shape_class(x2: torch.Tensor, projs: tuple[LoRAProjection, ...]) -> str:
    """The measured-dispatch key of a GEMM op: token bucket, then per projection out x in, base kind, rank, DoRA."""

    def one(p: LoRAProjection) -> str:
        kind = ("nf4dq" if p.base.nested else "nf4") if isinstance(p.base, NF4Weight) else "dense"
        return f"{p.shape[0]}x{p.shape[1]}:{kind}:r{p.rank}{':dora' if p.magnitude is not None else ''}"

    return f"M{shape_bucket(x2.shape[0])}|" + ",".join(one(p) for p in projs)


def _with(proj: LoRAProjection, factors: tuple) -> LoRAProjection:
    """`proj` with its factors replaced (the copies a measured-dispatch trial differentiates)."""
    a, b, m, mag, bias = factors
    return replace(proj, lora_A=a, lora_B=b, lora_M=m, magnitude=mag, bias=bias)


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
# backends: the four primitives that touch W
# ----------------------------------------------------------------------------------------------------------------

_PRIMITIVES = ("base_matmul", "base_matmul_t", "base_dmag", "base_row_norm_sq")
_BACKENDS: dict[str, SimpleNamespace] = {
    "torch": SimpleNamespace(name="torch", **{n: getattr(gemm_torch, n) for n in _PRIMITIVES}),
    "dequant": SimpleNamespace(name="dequant", **{n: getattr(gemm_dequant, n) for n in _PRIMITIVES}),
}


def backend_ops(backend: str) -> SimpleNamespace:
    """The four primitives of "torch", "dequant" or "triton"; the Functions call nothing else that touches W."""
    if backend == "triton" and "triton" not in _BACKENDS:
        mod = triton_module("qlora_linear")
        if mod is None:
            raise SlimtuneError("kernel backend 'triton' requested but triton is not installed")
        _BACKENDS["triton"] = SimpleNamespace(name="triton", **{n: getattr(mod, n) for n in _PRIMITIVES})
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise SlimtuneError(f"unknown GEMM backend {backend!r}; expected one of torch, dequant, triton") from None


# ----------------------------------------------------------------------------------------------------------------
# DoRA norm, cached per optimizer step
# ----------------------------------------------------------------------------------------------------------------

# id(lora_B) -> (weakref to lora_B, key, norm). The key holds the weights generation (slimtune.ops.generation: the
# Trainer advances it after every optimizer step) and the storage and version counter of every tensor the norm
# depends on, so the norm is computed once per step (forward, and again for free in a checkpointed recompute) and
# never goes stale. The generation is what sees a step: bitsandbytes' 8-bit / paged AdamW write A/B/M without
# bumping their versions, and FSDP2 gathers updated shards into the same unsharded tensors with their versions kept
# (issue 23: a version-only key reused step 1's norm for ever). The versions still catch in-place edits elsewhere.
_norm_cache: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _tensor_key(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def _base_key(base) -> tuple:
    return _tensor_key(base.packed if isinstance(base, NF4Weight) else base)


def dora_norm(
    ops: SimpleNamespace, proj: LoRAProjection, lora_A, lora_B, lora_M, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """n = ‖W + s·B M A‖ per row (fp32, no grad) without materialising W:

    n² = ‖W_o‖² + 2s·⟨B_o, (A' Wᵀ)ᵀ_o⟩ + s²·B_o (A' A'ᵀ) B_oᵀ,  A' = M A  (r, in); A' Wᵀ is an (r, out) GEMM in
    `dtype` (the activations' dtype: tensor cores, not an fp32 CUDA-core GEMM). Cached until A, B or M change in
    place or the weights generation moves on (`slimtune.ops.generation.weights_changed`: after each optimizer step).
    """
    if lora_A is None:
        wsq = proj.base_norm_sq if proj.base_norm_sq is not None else ops.base_row_norm_sq(proj.base)
        return wsq.float().sqrt()
    dt = dtype or lora_A.dtype
    key = (weights_generation(), ops.name, dt, proj.scale, _base_key(proj.base),
           *map(_tensor_key, (lora_A, lora_B, lora_M)))
    hit = _norm_cache.get(id(lora_B))
    if hit is not None and hit[0]() is lora_B and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        wsq = proj.base_norm_sq if proj.base_norm_sq is not None else ops.base_row_norm_sq(proj.base)
        a = lora_A.float() if lora_M is None else lora_M.float() @ lora_A.float()
        b = lora_B.float()
        s = proj.scale
        p = ops.base_matmul(a.to(dt).contiguous(), proj.base).float()  # (r, out)
        cross = (b * p.T).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        norm = (wsq.float() + 2.0 * s * cross + (s * s) * quad).clamp_min(0.0).sqrt()
    bid = id(lora_B)
    _norm_cache[bid] = (weakref.ref(lora_B, lambda r, bid=bid: _forget(bid, r)), key, norm)
    return norm


def _forget(bid: int, ref: weakref.ref) -> None:
    if bid in _norm_cache and _norm_cache[bid][0] is ref:  # not an entry of a newer tensor with the same id
        del _norm_cache[bid]


# ----------------------------------------------------------------------------------------------------------------
# one projection: forward / backward math shared by the linear, MLP and q/k/v Functions
# ----------------------------------------------------------------------------------------------------------------


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def dropout_seed(proj: LoRAProjection) -> int | None:
    """A fresh seed for the projection's LoRA dropout mask (None without dropout or adapter).

    Drawn from torch's default CPU generator (no device sync; reproducible under torch.manual_seed and resumable
    from the saved RNG state); the (T, in) mask itself is regenerated from it in backward, never saved.
    """
    if proj.dropout <= 0.0 or proj.lora_A is None:
        return None
    return int(torch.randint(0, 2**62, (1,)).item())


def _dropped(x: torch.Tensor, proj: LoRAProjection, seed: int) -> torch.Tensor:
    """drop(x): a transient (T, in) copy."""
    return dropout_mask(x.shape, proj.dropout, seed, device=x.device, dtype=x.dtype).mul_(x)


def projection_forward(
    ops: SimpleNamespace,
    x: torch.Tensor,
    proj: LoRAProjection,
    factors: tuple,
    *,
    seed: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y (T, out) = the projection of x (T, in); also returns xa = drop(X) Aᵀ (T, r) and the DoRA norm n (out,).

    `seed` (from `dropout_seed`) switches on LoRA dropout; pass the same seed to the backward functions.
    """
    lora_A, lora_B, lora_M, magnitude, bias = factors
    dt = x.dtype
    xa = xam = norm = scale_vec = None
    if lora_A is not None:
        xa = (x if seed is None else _dropped(x, proj, seed)) @ lora_A.to(dt).T
        xam = xa if lora_M is None else xa @ lora_M.to(dt).T
    if magnitude is not None:
        norm = dora_norm(ops, proj, lora_A, lora_B, lora_M, dtype=dt)
        scale_vec = magnitude.float() / norm
    y = ops.base_matmul(
        x, proj.base, lora_left=xam, lora_right=None if lora_B is None else lora_B.to(dt).T,
        lora_scale=proj.scale, out_scale=scale_vec, bias=bias, out=out,
    )
    return y, xa, norm


def projection_backward(
    ops: SimpleNamespace,
    dy: torch.Tensor,
    x: torch.Tensor | None,
    proj: LoRAProjection,
    factors: tuple,
    xa: torch.Tensor | None,
    norm: torch.Tensor | None,
    *,
    needs: tuple[bool, ...],
    seed: int | None = None,
) -> tuple[tuple, torch.Tensor | None]:
    """Factor gradients (dA, dB, dM, dmag, dbias) of one projection, and G·M (T, r) for `projection_grad_input`.

    `needs` = (x, A, B, M, mag, bias) flags. With c = m/n (DoRA) or 1, dz = dY·c, G = s·dz B (T, r),
    xam = xa Mᵀ:  dB = s·dzᵀ xam,  dM = Gᵀ xa,  dA = (G M)ᵀ X,  dm = Σ_t dY ⊙ z / n,  dbias = Σ_t dY
    (and dX = dz W + (G M) A in `projection_grad_input`). x is only read for dA and dm, so a caller may reuse x's
    storage for dX after this returns.
    """
    need_x, need_a, need_b, need_m, need_mag, need_bias = needs
    lora_A, lora_B, lora_M, magnitude, bias = factors
    dt = dy.dtype
    s = proj.scale
    da = db = dm = dmag = dbias = gm = xam = b_c = None
    c = None if magnitude is None else magnitude.float() / norm
    if lora_A is not None:
        b_c, m_c = lora_B.to(dt), _cast(lora_M, dt)
        if need_b or need_mag:
            xam = xa if m_c is None else xa @ m_c.T
        if need_b:
            dyt_xam = dy.T @ xam  # (out, r)
            db = (dyt_xam.float() * (s if c is None else s * c[:, None])).to(lora_B.dtype)
        if need_x or need_a or need_m:
            b_eff = b_c if c is None else (b_c.float() * c[:, None]).to(dt)
            g = (dy @ b_eff) * s  # (T, r)
            if need_m:
                dm = (g.T @ xa).to(lora_M.dtype)
            gm = g if m_c is None else g @ m_c
            if need_a:
                da = (gm.T @ (x if seed is None else _dropped(x, proj, seed))).to(lora_A.dtype)
    if need_mag:
        zdy = ops.base_dmag(
            x, dy, proj.base, lora_left=xam, lora_right=None if b_c is None else b_c.T, lora_scale=s
        )
        dmag = (zdy / norm).to(magnitude.dtype)
    if need_bias:
        dbias = dy.float().sum(0).to(bias.dtype)
    return (da, db, dm, dmag, dbias), gm


def projection_grad_input(
    ops: SimpleNamespace,
    dy: torch.Tensor,
    proj: LoRAProjection,
    factors: tuple,
    norm: torch.Tensor | None,
    gm: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """dX = (dY·c) W + (G M) A: one GEMM call of the backend; into `out` (added when `accumulate`).

    With dropout the adapter term is masked, ((G M) A) ⊙ mask, and added after the GEMM (untuned: no GPU).
    """
    lora_A, _, _, magnitude, _ = factors
    c = None if magnitude is None else magnitude.float() / norm
    a_c = None if gm is None else lora_A.to(dy.dtype)
    if seed is None or gm is None:
        return ops.base_matmul_t(
            dy, proj.base, out_scale=c, lora_left=gm, lora_right=a_c, out=out, accumulate=accumulate
        )
    dx = ops.base_matmul_t(dy, proj.base, out_scale=c, out=out, accumulate=accumulate)
    shape = (dy.shape[0], proj.shape[1])
    return dx.addcmul_(gm @ a_c, dropout_mask(shape, proj.dropout, seed, device=dy.device, dtype=dy.dtype))


def factor_needs(proj_factors: tuple, needs_input_grad: tuple[bool, ...]) -> tuple[bool, ...]:
    """(A, B, M, mag, bias) grad flags: only for tensors that exist and need a gradient."""
    return tuple(t is not None and bool(n) for t, n in zip(proj_factors, needs_input_grad, strict=True))


def saved_for(factors: tuple, needs: tuple[bool, ...]) -> tuple[bool, bool]:
    """(keep x, keep xa) for one projection, given its factor `needs`: x only for dA / dm; xa for dB / dM / dm."""
    need_a, need_b, need_m, need_mag, _ = needs
    keep_x = need_a or need_mag
    keep_xa = factors[0] is not None and (need_b or need_m or need_mag)
    return keep_x, keep_xa


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function (one, for every backend)
# ----------------------------------------------------------------------------------------------------------------


class QLoRALinearFunction(torch.autograd.Function):
    """y = proj(x) for x (T, in). Saves X (only when dA or dm is needed), X Aᵀ (T, r) and the DoRA norm (out,).

    Inputs after (x, proj, backend) are the factors in `LoRAProjection.factors()` order (A, B, M, mag, bias).
    """

    @staticmethod
    def forward(ctx, x, proj: LoRAProjection, backend: str, *factors):
        ops = backend_ops(backend)
        seed = dropout_seed(proj)
        y, xa, norm = projection_forward(ops, x, proj, factors, seed=seed)
        needs = factor_needs(factors, ctx.needs_input_grad[3:])
        keep_x, keep_xa = saved_for(factors, needs)
        ctx.proj, ctx.backend, ctx.needs, ctx.seed = proj, backend, needs, seed
        ctx.save_for_backward(x if keep_x else None, xa if keep_xa else None, norm, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, norm, *factors = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs)
        ops, dy, factors = backend_ops(ctx.backend), dy.contiguous(), tuple(factors)
        grads, gm = projection_backward(ops, dy, x, ctx.proj, factors, xa, norm, needs=needs, seed=ctx.seed)
        dx = projection_grad_input(ops, dy, ctx.proj, factors, norm, gm, seed=ctx.seed) if needs[0] else None
        return (dx, None, None, *grads)


def qlora_linear(x: torch.Tensor, *, proj: LoRAProjection, backend: str = "torch") -> torch.Tensor:
    """The QLoRA linear for a 2-D x (T, in) on the given backend ("torch" | "dequant" | "triton")."""
    if x.dim() != 2:
        raise ValueError(f"qlora_linear expects a 2-D (tokens, in) input, got shape {tuple(x.shape)}")
    if x.shape[1] != proj.shape[1]:
        raise ValueError(f"qlora_linear: input has {x.shape[1]} features, base weight expects {proj.shape[1]}")
    return QLoRALinearFunction.apply(x, proj, backend, *proj.factors())
