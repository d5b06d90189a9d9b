"""SoRA (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"): LoRA with a gate
g ∈ R^r between A and B, made sparse by a proximal (L1) step, so the rank adapts during training.

    y = W x + s · B diag(g) A x           A (r, in) kaiming, B (out, r) zero, g ~ N(0, 1) (the public code's init)

After every optimizer step the gate takes the proximal step of ξ·‖g‖₁, the soft-threshold

    g ← T_ξ(g) = sign(g) · max(|g| − ξ, 0)        (ξ = ``threshold``; the public code's ``sparse_lambda_2``)

(``on_step``; the optimizer's own step is the gradient step of the loss). The public SparseAdamW applies it with a
constant ξ after its Adam update, as here; its three masked assignments also zero values in (ξ, 2ξ] (they are first
shifted into (0, ξ] and then caught by the |g| < ξ test), which the paper's T_ξ does not: we apply the paper's
operator. A persistent buffer holds the last step the proximal step ran for, so it runs exactly once per optimizer
step, also when a resumed trainer replays ``on_step`` for the restored step (exact resume). The gate is 1-D, so the
trainer's AdamW gives it no weight decay (the public code excludes it from decay too).

Fused path: diag(g) is the (r, r) middle factor the fused ops fold into the small (T, r) product, as SLoRA's N.
Export: a zeroed gate entry removes its rank: the PEFT export is the smaller LoRA A[kept], s·B[:, kept]·diag(g[kept])
with a per-module rank (``rank_pattern``); the native format keeps every rank (training can continue).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import AdapterConfig, LowRank, PeftFactors, register
from slimtune.adapters.lora import LoRA


class SoRAConfig(AdapterConfig):
    kind: Literal["sora"] = "sora"
    threshold: float = Field(
        1e-3, ge=0.0, description="ξ of the proximal step g ← sign(g)·max(|g| − ξ, 0) after every optimizer step "
        "(the public code's sparse_lambda_2; its GLUE scripts use 3e-4 over 20 epochs)."
    )


def soft_threshold(g: torch.Tensor, xi: float) -> torch.Tensor:
    """T_ξ(g) = sign(g) · max(|g| − ξ, 0): the proximal operator of ξ·‖g‖₁."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0)


@register
class SoRA(LoRA):
    kind = "sora"
    Config = SoRAConfig
    description = "SoRA: LoRA with an r-gate sparsified by a proximal L1 step; zeroed ranks are dropped at export"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device = self.lora_A.device
        self.sora_gate = nn.Parameter(torch.randn(config.rank, device=device))  # (r,)
        self.register_buffer("sora_prox_step", torch.zeros((), dtype=torch.int64, device=device))  # last prox step
        self._prox_step = 0  # host mirror of sora_prox_step (no device sync per step)

    def factors(self) -> LowRank:
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, mid=torch.diag(self.sora_gate))

    def after_load(self) -> None:
        self._prox_step = int(self.sora_prox_step)

    def on_step(self, step: int, total_steps: int) -> None:
        """The proximal step of optimizer step ``step`` (once per step: a replay on resume is a no-op)."""
        if step <= self._prox_step or self.sora_gate.device.type == "meta":
            return
        with torch.no_grad():
            self.sora_gate.copy_(soft_threshold(self.sora_gate, self.config.threshold))
            self.sora_prox_step.fill_(step)
        self._prox_step = step

    def kept(self) -> torch.Tensor:
        """Indices of the ranks whose gate is not zero."""
        return torch.nonzero(self.sora_gate.detach() != 0).flatten()

    def peft_factors(self) -> PeftFactors:
        """The LoRA of the surviving ranks: A[kept], s·B[:, kept]·g[kept] (scale 1). A module whose gates are all zero
        exports one zero rank (PEFT has no rank 0)."""
        keep = self.kept()
        if keep.numel() == 0:
            return PeftFactors(A=torch.zeros(1, self.in_features), B=torch.zeros(self.out_features, 1), alpha=1.0)
        g = self.sora_gate.detach().float()[keep]  # (k,)
        a = self.lora_A.detach().float()[keep]  # (k, in)
        b = self.scale * self.lora_B.detach().float()[:, keep] * g  # (out, k)
        return PeftFactors(A=a, B=b, alpha=float(keep.numel()))
