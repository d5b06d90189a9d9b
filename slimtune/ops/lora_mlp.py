"""LoRA gated MLP: out = down(act(gate(X)) ⊙ up(X)), each projection a frozen base (NF4 or dense) + adapter.

``activation="silu"`` is SwiGLU (Llama, Mistral, Qwen, Phi-3); ``"gelu_tanh"`` is GeGLU with the tanh-approximate
GELU (Gemma's ``gelu_pytorch_tanh``). Phi-3's packed ``gate_up_proj`` (out = 2·I: first half gate, second half up,
as HF's ``chunk(2, dim=-1)``) is one projection ``gate_up=`` instead of ``gate=`` / ``up=``.

One autograd Function (:class:`LoRAMLPFunction`, shared by every backend) saves X (only when a gate/up adapter
needs dA or dm), e = gate(X) and g = up(X) — for the packed projection the one (T, 2I) output holding both — and
each adapter's (T, r) X Aᵀ and DoRA norm. Backward recomputes h = act(e) ⊙ g into one new (T, I) buffer, writes dh
into that same buffer once h is dead, then de and dg into e's and g's storage (and dX into X's when asked): the
only (T, I) allocation in backward is h, packed or not.

The projections run through the projection math of slimtune/ops/lora_linear.py on the chosen GEMM backend's
primitives; the elementwise activation runs ``glu`` / ``glu_backward_`` below (torch) or their Triton twins in
slimtune/kernels/lora_mlp.py (same signatures, reached only through ``slimtune.ops.dispatch.triton_module``).
``lora_mlp_reference`` is the readable formula (ground truth in tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from slimtune.ops.autotune import autograd_trial
from slimtune.ops.dispatch import GEMM_BACKENDS, resolve_backend, triton_allowed, triton_module
from slimtune.ops.lora_linear import (
    LoRAProjection,
    _with,
    backend_ops,
    dropout_seed,
    factor_needs,
    gemm_shape_class,
    lora_linear_reference,
    projection_backward,
    projection_forward,
    projection_grad_input,
    saved_for,
)

__all__ = [
    "ACTIVATIONS",
    "GLUPrimitives",
    "LoRAMLPFunction",
    "glu",
    "glu_backward_",
    "lora_mlp",
    "lora_mlp_fused",
    "lora_mlp_reference",
]

ACTIVATIONS = ("silu", "gelu_tanh")
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# ----------------------------------------------------------------------------------------------------------------
# the activation: torch primitives (ground truth of the Triton kernels)
# ----------------------------------------------------------------------------------------------------------------


def _act(e: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(e) if activation == "silu" else F.gelu(e, approximate="tanh")


def _act_and_grad(e: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(e), act'(e)) for fp32 e.

    silu' = σ(e)·(1 + e·(1 − σ(e)));  gelu_tanh' = ½(1 + t) + ½e(1 − t²)·k(1 + 3c e²),  t = tanh(k(e + c e³)).
    """
    if activation == "silu":
        sig = torch.sigmoid(e)
        return e * sig, sig * (1.0 + e * (1.0 - sig))
    t = torch.tanh(_GELU_K * (e + _GELU_C * e.pow(3)))
    d = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t.square()) * _GELU_K * (1.0 + 3.0 * _GELU_C * e.square())
    return 0.5 * e * (1.0 + t), d


def glu(e: torch.Tensor, g: torch.Tensor, *, activation: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(e) ⊙ g for e, g (rows, I) (any row strides), computed in fp32, stored in e's dtype."""
    h = (_act(e.float(), activation) * g.float()).to(e.dtype)
    return h if out is None else out.copy_(h)


def glu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, *, activation: str = "silu") -> None:
    """In place: e <- de = dh ⊙ g ⊙ act'(e),  g <- dg = dh ⊙ act(e)."""
    ef, gf, dhf = e.float(), g.float(), dh.float()
    a, da = _act_and_grad(ef, activation)
    e.copy_(dhf * gf * da)
    g.copy_(dhf * a)


class GLUPrimitives(NamedTuple):
    """The activation pieces of one backend (same signatures as `glu` / `glu_backward_`)."""

    forward: Callable[..., torch.Tensor]
    backward_: Callable[..., None]


TORCH_GLU = GLUPrimitives(glu, glu_backward_)


def glu_primitives(backend: str, x: torch.Tensor) -> GLUPrimitives:
    """Triton's for the "triton" backend, and for "dequant" (cuBLAS GEMMs) on a GPU Triton may use: the torch pieces
    would hold (T, I) fp32 temporaries; torch's otherwise."""
    if backend == "triton" or (backend == "dequant" and x.is_cuda and triton_allowed(x)):
        k = triton_module("lora_mlp")
        return GLUPrimitives(k.glu, k.glu_backward_)
    return TORCH_GLU


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function (one, for every backend)
# ----------------------------------------------------------------------------------------------------------------


def _split(eg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (T, I) gate and up halves of the packed (T, 2I) gate_up output (views; row stride 2I)."""
    i = eg.shape[1] // 2
    return eg[:, :i], eg[:, i:]


class LoRAMLPFunction(torch.autograd.Function):
    """out = down(act(gate(x)) ⊙ up(x)) for x (T, hidden).

    ``projs`` is (gate, up, down), or (gate_up, down) for a packed gate/up projection. The inputs after
    (x, projs, backend, glu_prims, activation, inplace_input_grad) are the factors of each projection of ``projs``,
    five each in `LoRAProjection.factors()` order (A, B, M, mag, bias).
    """

    @staticmethod
    def forward(ctx, x, projs: tuple, backend: str, prims: GLUPrimitives, activation: str, inplace_input_grad: bool,
                *factors):
        ops = backend_ops(backend)
        n_in = len(projs) - 1  # 1 (packed gate_up) or 2 (gate, up)
        per_proj = [factors[5 * i : 5 * i + 5] for i in range(len(projs))]
        seeds = tuple(dropout_seed(p) for p in projs)  # LoRA dropout: independent masks per projection
        ins, xas, norms = [], [], []
        for i in range(n_in):
            y_i, xa, n = projection_forward(ops, x, projs[i], per_proj[i], seed=seeds[i])
            ins.append(y_i)
            xas.append(xa)
            norms.append(n)
        e, g = _split(ins[0]) if n_in == 1 else ins
        h = prims.forward(e, g, activation=activation)
        y, xa_d, n_d = projection_forward(ops, h, projs[-1], per_proj[-1], seed=seeds[-1])
        del h  # recomputed in backward

        needs = [factor_needs(f, ctx.needs_input_grad[6 + 5 * i : 11 + 5 * i]) for i, f in enumerate(per_proj)]
        keep = [saved_for(f, nd) for f, nd in zip(per_proj, needs, strict=True)]
        keep_x = any(k[0] for k in keep[:n_in])
        ctx.projs, ctx.backend, ctx.prims, ctx.activation = projs, backend, prims, activation
        ctx.needs, ctx.seeds, ctx.n_in = needs, seeds, n_in
        ctx.recompute_h = keep[-1][0]  # down needs h for dA / dm
        # dX may go into X's storage only when that storage belongs to no leaf (a parameter or a user's input)
        root = x._base if x._base is not None else x
        ctx.inplace_input_grad = bool(inplace_input_grad) and keep_x and not root.is_leaf
        kept_xa = [xa if k[1] else None for xa, k in zip((*xas, xa_d), keep, strict=True)]
        ctx.save_for_backward(x if keep_x else None, *ins, *kept_xa, *norms, n_d, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        n_in, n_p = ctx.n_in, ctx.n_in + 1
        x, *rest = ctx.saved_tensors
        ins, xas = rest[:n_in], rest[n_in : n_in + n_p]
        norms, factors = rest[n_in + n_p : n_in + 2 * n_p], rest[n_in + 2 * n_p :]
        per_proj = [tuple(factors[5 * i : 5 * i + 5]) for i in range(n_p)]
        ops, prims, act = backend_ops(ctx.backend), ctx.prims, ctx.activation
        p_down = ctx.projs[-1]
        need_x = ctx.needs_input_grad[0]
        need_dh = need_x or any(any(nd) for nd in ctx.needs[:n_in])
        e, g = _split(ins[0]) if n_in == 1 else ins
        dy = dy.contiguous()

        h = prims.forward(e, g, activation=act) if ctx.recompute_h else None  # the one (T, I) allocation
        grads_down, gm_d = projection_backward(
            ops, dy, h, p_down, per_proj[-1], xas[-1], norms[-1], needs=(need_dh, *ctx.needs[-1]), seed=ctx.seeds[-1]
        )
        grads_in: list = [(None,) * 5] * n_in
        dx = None
        if need_dh:
            dh = projection_grad_input(ops, dy, p_down, per_proj[-1], norms[-1], gm_d, out=h, seed=ctx.seeds[-1])
            prims.backward_(dh, e, g, activation=act)  # e <- de, g <- dg (for gate_up: its (T, 2I) buffer)
            del dh, h
            douts = ins  # now the gradients of the gate/up outputs, in their own storage
            gms = []
            for i in range(n_in):
                grads_in[i], gm = projection_backward(
                    ops, douts[i], x, ctx.projs[i], per_proj[i], xas[i], norms[i], needs=(need_x, *ctx.needs[i]),
                    seed=ctx.seeds[i],
                )
                gms.append(gm)
            if need_x:  # x has been read for the last time
                for i in range(n_in):
                    out = dx if i else (x if ctx.inplace_input_grad else None)
                    dx = projection_grad_input(
                        ops, douts[i], ctx.projs[i], per_proj[i], norms[i], gms[i], out=out, accumulate=i > 0,
                        seed=ctx.seeds[i],
                    )
        grads = [gr for gi in grads_in for gr in gi]
        return (dx, None, None, None, None, None, *grads, *grads_down)


# ----------------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------------


def _projections(gate, up, down, gate_up, x_features: int) -> tuple[LoRAProjection, ...]:
    """(gate, up, down) or (gate_up, down), with the shapes checked."""
    if gate_up is not None:
        if gate is not None or up is not None:
            raise ValueError("lora_mlp: pass either gate_up= (packed) or gate= and up=, not both")
        two_i, hid = gate_up.shape
        if two_i % 2 or down.shape[1] != two_i // 2 or x_features != hid:
            raise ValueError(
                f"lora_mlp: shapes do not chain: x has {x_features} features, gate_up {gate_up.shape}, "
                f"down {down.shape}"
            )
        return (gate_up, down)
    if gate is None or up is None:
        raise ValueError("lora_mlp: gate= and up= are required without gate_up=")
    if gate.shape != up.shape or down.shape[1] != gate.shape[0] or x_features != gate.shape[1]:
        raise ValueError(
            f"lora_mlp: shapes do not chain: x has {x_features} features, gate {gate.shape}, up {up.shape}, "
            f"down {down.shape}"
        )
    return (gate, up, down)


def lora_mlp_fused(
    x: torch.Tensor,
    *,
    gate: LoRAProjection | None = None,
    up: LoRAProjection | None = None,
    down: LoRAProjection,
    backend: str = "torch",
    inplace_input_grad: bool = False,
    activation: str = "silu",
    gate_up: LoRAProjection | None = None,
) -> torch.Tensor:
    """The fused MLP for a 2-D x (T, hidden) on the given backend ("torch" | "dequant" | "triton")."""
    if x.dim() != 2:
        raise ValueError(f"lora_mlp expects a 2-D (tokens, hidden) input, got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    projs = _projections(gate, up, down, gate_up, x.shape[1])
    factors = [t for p in projs for t in p.factors()]
    return LoRAMLPFunction.apply(
        x, projs, backend, glu_primitives(backend, x), activation, inplace_input_grad, *factors
    )


def lora_mlp(
    x: torch.Tensor,
    *,
    gate: LoRAProjection | None = None,
    up: LoRAProjection | None = None,
    down: LoRAProjection,
    backend: str | None = None,
    inplace_input_grad: bool = False,
    activation: str = "silu",
    gate_up: LoRAProjection | None = None,
) -> torch.Tensor:
    """Gated MLP for x (..., hidden) -> (..., hidden) through one fused autograd Function.

    ``activation``: "silu" (SwiGLU) or "gelu_tanh" (GeGLU). ``gate_up``: a packed (2I, hidden) gate/up projection
    (Phi-3), split in the op; then ``gate`` and ``up`` are None. ``inplace_input_grad=True`` writes dX into X's
    storage once X is dead (X must be an intermediate activation that nothing else saved for backward, e.g. an
    RMSNorm output whose backward keeps its own input; autograd's version check raises if another saved it).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    projs = _projections(gate, up, down, gate_up, x.shape[-1])
    factors = [t for p in projs for t in p.factors()]

    def fn(b, x, *f):
        ps = [_with(p, f[5 * i : 5 * i + 5]) for i, p in enumerate(projs)]
        kw = dict(gate_up=ps[0], down=ps[1]) if len(ps) == 2 else dict(gate=ps[0], up=ps[1], down=ps[2])
        return lora_mlp_fused(x, backend=b, activation=activation, **kw)

    b = resolve_backend(
        x, backend, op="lora_mlp", shape_class=f"{gemm_shape_class(x2, projs)}|{activation}", choices=GEMM_BACKENDS,
        trial=autograd_trial(fn, (x2, *factors), rows=1),
    )
    y = lora_mlp_fused(
        x2, gate=gate, up=up, down=down, gate_up=gate_up, backend=b, inplace_input_grad=inplace_input_grad,
        activation=activation,
    )
    return y.reshape(*lead, y.shape[-1])


def lora_mlp_reference(
    x: torch.Tensor,
    *,
    gate: LoRAProjection | None = None,
    up: LoRAProjection | None = None,
    down: LoRAProjection,
    dtype: torch.dtype | None = None,
    activation: str = "silu",
    gate_up: LoRAProjection | None = None,
) -> torch.Tensor:
    """The formula in plain autograd (materialises W; everything in `dtype`, default x.dtype)."""
    if gate_up is not None:
        e, g = lora_linear_reference(x, gate_up, dtype=dtype).chunk(2, dim=-1)  # as HF's Phi3MLP
    else:
        e, g = lora_linear_reference(x, gate, dtype=dtype), lora_linear_reference(x, up, dtype=dtype)
    return lora_linear_reference(_act(e, activation) * g, down, dtype=dtype)
