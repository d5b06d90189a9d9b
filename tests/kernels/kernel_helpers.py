"""Helpers shared by the kernel tests (importable because pytest puts this folder on sys.path)."""

import os

import torch

from slimtune.ops.lora_linear import LoRAProjection
from slimtune.ops.nf4 import quantize_4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Relative-error bounds against float64 (DESIGN.md §3): exact-ish fp32 dots in the interpreter, tf32 on a GPU.
TOL = {torch.float32: 2e-5 if INTERPRET else 5e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
R = 7  # the odd LoRA rank of the tests


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ in float64; a non-finite `a` fails (a kernel left NaN behind)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def random_base(kind: str, out_f: int, in_f: int, seed: int, dtype: torch.dtype = torch.float32):
    """A frozen base weight: "dense" (in `dtype`), "nf4" or "nf4dq" (NF4 with double quant)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(DEVICE)
    return w.to(dtype) if kind == "dense" else quantize_4bit(w, double_quant=(kind == "nf4dq"))


def random_projection(kind, out_f, in_f, seed, *, scale, lora=True, M=False, dora=False, bias=False, frozen=(),
                      wdtype=torch.float32) -> LoRAProjection:
    """A projection with random, nonzero factors (B included); `frozen` names factors without requires_grad."""
    g = torch.Generator().manual_seed(seed)

    def p(*shape, std=0.1, shift=0.0, name=""):
        t = (torch.randn(*shape, generator=g) * std + shift).to(DEVICE)
        if name == "magnitude":
            t = t.abs()
        return t.requires_grad_(name not in frozen)

    return LoRAProjection(
        base=random_base(kind, out_f, in_f, seed, wdtype),
        bias=p(out_f, name="bias") if bias else None,
        lora_A=p(R, in_f, name="lora_A") if lora else None,
        lora_B=p(out_f, R, name="lora_B") if lora else None,
        scale=scale,
        lora_M=p(R, R, std=0.3, shift=0.5, name="lora_M") if M else None,
        magnitude=p(out_f, std=0.2, shift=1.0, name="magnitude") if dora else None,
    )
