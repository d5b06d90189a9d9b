"""DyLoRA (Valipour et al., EACL 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation"): one adapter that works at every rank b ≤ r after training.

    training step t:   b_t ~ U{1, …, r}         y = W x + (alpha / b_t) · B[:, :b_t] A[:b_t] x
    after training:    any b ≤ r                y = W x + (alpha / b)   · B[:, :b]   A[:b]   x

A (r, in) kaiming-uniform, B (out, r) zero, as LoRA. The scale alpha / b is the paper's (the public code writes it as
alpha / r times √(r/b) on each factor). ``frozen: true`` (the paper's Algorithm 1, "we only update the b-th row/column")
detaches the first b − 1 rows of A and columns of B in the step, so only the b-th direction learns; ``frozen: false``
trains all of A[:b], B[:, :b].

One b per optimizer step for the whole model, drawn from ``random.Random(sample_seed · 1000003 + t)``: a pure function
of the step, so a resumed run draws exactly the same ranks (``on_step`` sets the next one; the trainer calls it after
every step and once on resume). In eval mode (evaluation, generation, merge, export) the adapter runs at
``eval_rank`` (default r); ``slimtune export --rank b`` exports the rank-b LoRA (``select_rank``).

Fused path: the truncated (and partly detached) factors go through the same fused Functions as LoRA's
(``factors``): slicing and ``torch.cat`` are autograd views/copies of r × in values, never of activations.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from slimtune.adapters.base import AdapterConfig, LowRank, PeftFactors, register
from slimtune.adapters.lora import LoRA


class DyLoRAConfig(AdapterConfig):
    kind: Literal["dylora"] = "dylora"
    frozen: bool = Field(
        True, description="Only the sampled b-th row of A / column of B learns in a step (the paper's Algorithm 1); "
        "false: all of A[:b], B[:, :b]."
    )
    sample_seed: int = Field(0, ge=0, description="Seed of the per-step rank draws b_t ~ U{1..r}.")
    eval_rank: int | None = Field(
        None, gt=0, description="Rank used outside training (eval, merge, export); None = rank. `slimtune export "
        "--rank b` overrides it."
    )

    @model_validator(mode="after")
    def _eval_rank_fits(self) -> DyLoRAConfig:
        if self.eval_rank is not None and self.eval_rank > self.rank:
            raise ValueError(f"eval_rank {self.eval_rank} must be at most rank {self.rank}")
        return self


def sampled_rank(sample_seed: int, step: int, r: int) -> int:
    """b for optimizer step ``step + 1`` (0-based ``step`` = steps done): uniform on {1, …, r}, a pure function."""
    return random.Random(sample_seed * 1_000_003 + step).randrange(r) + 1


@register
class DyLoRA(LoRA):
    kind = "dylora"
    Config = DyLoRAConfig
    description = "DyLoRA: LoRA trained at a random truncation b ≤ r each step; any rank ≤ r works after training"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        self.train_rank = sampled_rank(config.sample_seed, 0, config.rank)  # b of the next optimizer step
        self.eval_rank = config.eval_rank or config.rank
        self.train(base_layer.training)  # the mode of the model it joins (a model in eval runs at eval_rank)

    def on_step(self, step: int, total_steps: int) -> None:
        self.train_rank = sampled_rank(self.config.sample_seed, step, self.config.rank)

    def select_rank(self, rank: int) -> None:
        """Run (eval, merge, export) at ``rank`` ≤ r from now on."""
        if not 0 < rank <= self.config.rank:
            r = self.config.rank
            raise ValueError(f"--rank {rank}: a DyLoRA adapter of rank {r} runs at ranks 1..{r}")
        self.eval_rank = rank

    def truncated(self, b: int, *, frozen: bool = False) -> LowRank:
        """A[:b], B[:, :b] at scale alpha / b; ``frozen``: the first b − 1 directions carry no gradient."""
        a, bm = self.lora_A[:b], self.lora_B[:, :b]  # (b, in), (out, b)
        if frozen and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]], dim=0)
            bm = torch.cat([bm[:, : b - 1].detach(), bm[:, b - 1 :]], dim=1)
        return LowRank(A=a, B=bm, scale=self.config.alpha / b)

    def factors(self) -> LowRank:
        if self.training:
            return self.truncated(self.train_rank, frozen=self.config.frozen)
        return self.truncated(self.eval_rank)

    def delta_weight(self) -> torch.Tensor:
        f = self.truncated(self.eval_rank)
        return f.scale * (f.B.float() @ f.A.float())

    def peft_factors(self) -> PeftFactors:
        """The rank-``eval_rank`` LoRA, PEFT-native: r = b, lora_alpha = alpha (scale alpha / b)."""
        b = self.eval_rank
        return PeftFactors(A=self.lora_A[:b].detach().float(), B=self.lora_B[:, :b].detach().float(),
                           alpha=self.config.alpha)
