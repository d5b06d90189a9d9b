"""LoRA (Hu et al. 2021): y = W x + (alpha / r) · B A drop(x); A kaiming-uniform(a=√5), B = 0."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from slimtune.adapters.base import Adapter, AdapterConfig, LowRank, PeftFactors, kaiming_uniform_, register


class LoRAConfig(AdapterConfig):
    kind: Literal["lora"] = "lora"


@register
class LoRA(Adapter):
    kind = "lora"
    Config = LoRAConfig
    description = "LoRA: trainable B A on each target, s = alpha/r"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts):
        super().__init__(base_layer, config, name=name, **facts)
        device = base_layer.weight.device
        r = config.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in) fp32 master
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # (out, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_uniform_(self.lora_A)
            self.lora_B.zero_()

    def factors(self) -> LowRank:
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale)

    def peft_factors(self) -> PeftFactors:
        # Native PEFT LoRA: keep r and alpha so the exported config reads as the user wrote it.
        return PeftFactors(
            A=self.lora_A.detach().float(), B=self.lora_B.detach().float(), alpha=self.config.alpha, rslora=False
        )
