"""SFT / continued pretraining: the summed next-token loss of the target tokens, normalised by their count over
the step (4 micro-batches of 1 give the gradient of 1 micro-batch of 4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from slimtune.data.dataset import count_target_tokens
from slimtune.models.fused import causal_lm_loss
from slimtune.objectives.base import Objective


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token losses over the batch's target tokens (labels != -100), fp32 0-dim.

    A packed batch (``position_ids``, data.packing on SFT) goes without attention_mask: transformers builds the
    block-diagonal causal mask from the restarting positions, so examples never attend to each other.
    """
    if "position_ids" in batch:
        return causal_lm_loss(model, input_ids=batch["input_ids"], labels=batch["labels"],
                              position_ids=batch["position_ids"], reduction="sum")
    return causal_lm_loss(model, input_ids=batch["input_ids"], labels=batch["labels"],
                          attention_mask=batch["attention_mask"], reduction="sum")


class SFT(Objective):
    """``loss_fn(model, batch)``: the summed token loss (default the chunked linear cross-entropy)."""

    name = "sft"

    def __init__(self, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = causal_lm_loss_sum):
        super().__init__()
        self.loss_fn = loss_fn

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_target_tokens(batch)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model, batch)
