"""Triton: the gated-activation elementwise kernels of the LoRA MLP (primitives of slimtune/ops/lora_mlp.py).

    h = act(e) ⊙ g                    forward    (act = silu: SwiGLU; act = gelu_tanh: Gemma's GeGLU)
    e <- dh ⊙ g ⊙ act'(e),  g <- dh ⊙ act(e)      backward, in place

e, g, h, dh are (rows, I) with unit column stride and any row stride, so e and g may be the two halves of Phi-3's
packed gate_up output (row stride 2I). The projections, what is saved and the autograd Function live in
slimtune/ops/lora_mlp.py; this module imports only torch, triton and
slimtune.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.nf4 import device_guard

__all__ = ["glu", "glu_backward_", "tanh", "ACTIVATIONS", "COMPILE_VARIANTS"]

ELEMENTWISE_BLOCK = 1024  # (untuned: no GPU)
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def tanh(u):
    """tanh via exp (libdevice has no interpreter version); absolute error ~1e-7 in fp32."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _act_and_grad(e, ACT: tl.constexpr):
    """(act(e), act'(e)) in fp32."""
    if ACT == 0:  # silu(e) = e·σ(e),  silu' = σ(e)·(1 + e·(1 − σ(e)))
        sig = tl.sigmoid(e)
        return e * sig, sig * (1.0 + e * (1.0 - sig))
    else:  # gelu_tanh(e) = ½e(1 + t), t = tanh(k(e + c e³)), k = √(2/π), c = 0.044715;
        # gelu' = ½(1 + t) + ½e(1 − t²)·k(1 + 3c e²)
        t = tanh(0.7978845608028654 * (e + 0.044715 * e * e * e))
        d = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * e * e)
        return 0.5 * e * (1.0 + t), d


@triton.jit
def _glu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, I, stride_e, stride_g, stride_h, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r, c = offs // I, offs % I
    e = tl.load(e_ptr + r * stride_e + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(e, ACT)
    tl.store(h_ptr + r * stride_h + c, (a * g).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dh_ptr, e_ptr, g_ptr, n, I, stride_dh, stride_e, stride_g, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    """In place: e <- dh·g·act'(e), g <- dh·act(e)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r, c = offs // I, offs % I
    dh = tl.load(dh_ptr + r * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + r * stride_e + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(e, ACT)
    tl.store(e_ptr + r * stride_e + c, (dh * g * da).to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + r * stride_g + c, (dh * a).to(g_ptr.dtype.element_ty), mask=mask)



def _check(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"glu: expected 2-D tensors with unit column stride, got {tuple(t.shape)} {t.stride()}")


def glu(e: torch.Tensor, g: torch.Tensor, *, activation: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(e) ⊙ g for e, g (rows, I) (row strides free); a new contiguous h unless ``out`` is given."""
    if out is None:
        out = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    _check(e, g, out)
    n = e.numel()
    if n:
        with device_guard(e):
            _glu_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
                e, g, out, n, e.shape[1], e.stride(0), g.stride(0), out.stride(0),
                ACT=ACTIVATIONS[activation], BLOCK=ELEMENTWISE_BLOCK,
            )
    return out


def glu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, *, activation: str = "silu") -> None:
    """In place: e <- de, g <- dg (see the module docstring)."""
    _check(dh, e, g)
    n = e.numel()
    if n:
        with device_guard(e):
            _glu_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
                dh, e, g, n, e.shape[1], dh.stride(0), e.stride(0), g.stride(0),
                ACT=ACTIVATIONS[activation], BLOCK=ELEMENTWISE_BLOCK,
            )


# ----------------------------------------------------------------------------------------------------------------
# the launches a training run makes, for the AOT compile matrix (tests/kernels/test_compile_matrix.py): dicts with
# name, kernel (attribute name), signature (runtime args), constexprs, num_warps, num_stages
# ----------------------------------------------------------------------------------------------------------------


def _compile_variants() -> list[dict]:
    out = []
    for dt in ("bf16", "fp16"):
        for act, code in ACTIVATIONS.items():  # silu: Llama / Qwen / Mistral / Phi-3; gelu_tanh: Gemma 2 / 3
            ints = {"n": "i64", "I": "i32"}
            out.append({
                "name": f"glu_fwd[{dt},{act}]", "kernel": "_glu_fwd_kernel",
                "signature": {"e_ptr": f"*{dt}", "g_ptr": f"*{dt}", "h_ptr": f"*{dt}", **ints,
                              "stride_e": "i32", "stride_g": "i32", "stride_h": "i32"},
                "constexprs": {"ACT": code, "BLOCK": ELEMENTWISE_BLOCK}, "num_warps": 4, "num_stages": 2,
            })
            out.append({
                "name": f"glu_bwd[{dt},{act}]", "kernel": "_glu_bwd_kernel",
                "signature": {"dh_ptr": f"*{dt}", "e_ptr": f"*{dt}", "g_ptr": f"*{dt}", **ints,
                              "stride_dh": "i32", "stride_e": "i32", "stride_g": "i32"},
                "constexprs": {"ACT": code, "BLOCK": ELEMENTWISE_BLOCK}, "num_warps": 4, "num_stages": 2,
            })
    return out


COMPILE_VARIANTS: list[dict] = _compile_variants()
