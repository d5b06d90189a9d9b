"""rsLoRA (Kalajdzievski 2023): LoRA with the rank-stabilised scale s = alpha / sqrt(r)."""

from __future__ import annotations

import math
from typing import Literal

from slimtune.adapters.base import AdapterConfig, PeftFactors, register
from slimtune.adapters.lora import LoRA

class RsLoRAConfig(AdapterConfig):
    kind: Literal["rslora"] = "rslora"

    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank)

@register
class RsLoRA(LoRA):
    kind = "rslora"
    Config = RsLoRAConfig
    description = "rsLoRA: LoRA with s = alpha/sqrt(r), stable at high rank"

    def peft_factors(self) -> PeftFactors:
        f = super().peft_factors()
        f.rslora = True  # PEFT's use_rslora
        return f
