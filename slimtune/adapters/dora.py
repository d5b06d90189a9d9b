"""DoRA (Liu et al. 2024): weight-decomposed LoRA.

m ∈ R^out starts as the row L2 norm of W; n = row-norm(W + s·B A) is detached (no gradient through the norm, as in
the paper's §4.3 and PEFT). y = base(x) + (m/n − 1)·(W x) + (m/n)·s·B A drop(x); the bias is not scaled.
Merge: W' = (m / row-norm(W + ΔW)) · (W + ΔW).

The norm needs the dense W. On a 4-bit base it is dequantized inside the norm computation only and freed at once;
n is cached and recomputed only when A or B changed (the weights generation the Trainer advances after every
optimizer step, and their in-place version counters), i.e. once per optimizer step, not once per micro-batch — no
bf16 copy of W is kept around.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from slimtune.adapters.base import AdapterConfig, LowRank, PeftFactors, dense_weight, register
from slimtune.adapters.lora import LoRA
from slimtune.ops.generation import weights_generation


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The DoRA merge, fp32: W' = (m / row-norm(W + ΔW)) · (W + ΔW). W (out, in), ΔW = s·B A (out, in), m (out,).
    Used by the trained module (``merged_weight``) and by merges of PEFT DoRA files (slimtune.loram.pipeline)."""
    w = weight.float() + delta.float()
    return (magnitude.float() / w.norm(dim=1)).unsqueeze(1) * w


class DoRAConfig(AdapterConfig):
    kind: Literal["dora"] = "dora"


@register
class DoRA(LoRA):
    kind = "dora"
    Config = DoRAConfig
    description = "DoRA: LoRA direction + trainable per-row magnitude"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts):
        super().__init__(base_layer, config, name=name, **facts)
        with torch.no_grad():
            norm = dense_weight(base_layer).norm(dim=1)  # (out,)
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.device))  # (out,) fp32
        self._norm_cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_magnitude"):
            with torch.no_grad():
                self.lora_magnitude.copy_(dense_weight(self.base_layer).norm(dim=1))
            self._norm_cache = None

    def factors(self) -> LowRank:
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, magnitude=self.lora_magnitude)

    def after_load(self) -> None:
        self._norm_cache = None

    def weight_norm(self) -> torch.Tensor:
        """row-norm(W + s·B A), detached, fp32 (out,); cached until A or B change."""
        # the generation sees every optimizer step: bitsandbytes' 8-bit AdamW writes A/B without bumping their
        # versions (issue 23: a version-only key kept step 1's norm for the whole run)
        key = (weights_generation(), id(self.lora_A), self.lora_A._version, id(self.lora_B), self.lora_B._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                w = dense_weight(self.base_layer)  # (out, in) fp32; may alias the base weight: never in place
                w = w + self.scale * (self.lora_B.float() @ self.lora_A.float())
                self._norm_cache = (key, w.norm(dim=1))
        return self._norm_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out) = W x + bias
        bias = getattr(self.base_layer, "bias", None)
        wx = y if bias is None else y - bias.to(y.dtype)
        ratio = (self.lora_magnitude / self.weight_norm()).to(y.dtype)  # (out,) m/n, grad flows to m only
        lora = self._apply_lowrank(self.dropout(x), self.factors()).to(y.dtype)
        return y + (ratio - 1) * wx + ratio * lora

    def merged_weight(self) -> torch.Tensor:
        return dora_merge(dense_weight(self.base_layer), self.delta_weight(), self.lora_magnitude.detach())

    def peft_factors(self) -> PeftFactors:
        f = super().peft_factors()
        f.magnitude = self.lora_magnitude.detach().float()
        return f
