"""LoRA-SB (Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning"): LoRA-XS's W + s·B R A with only the r × r R trained, and A, B fixed from the best
rank-r approximation of the first full fine-tuning update.

    G = Σ_{first init_batches micro-batches} ∇_W L           the full gradient, estimated per module
    ΔW₀ = −η · sign(G)                                       the first AdamW step of full fine-tuning (η = lr)
    U_r S_r V_rᵀ = the rank-r truncated SVD of ΔW₀           (Eckart–Young: the best rank-r approximation)
    B = U_r (frozen), A = V_rᵀ (frozen), R = S_r / s         so s·B R A = [ΔW₀]_r at step 0

As the public code: the sign of the summed gradient (Adam's first step is η·sign(g) whatever the gradient's scale, so
the per-batch normalisation is irrelevant), the update not taken out again (the model starts one approximated
full-fine-tuning step away from the base, which is the method). R is stored as S_r / s so that the recipe's s =
alpha / r does not rescale the initial update.

Streaming: a module's gradient is (out, in), the whole model's would be a second model in fp32. ``init_from_data``
estimates the modules in groups whose fp32 gradients fit ``estimate_mib``, one pass over the batches per group; the
gradient of a module is caught by the fused ops themselves: while it is estimated, the adapter's factors are a zero
(out, in) probe P and an identity (A = I_in, B = P when in ≤ out; else A = P, B = I_out), so the forward is
unchanged (P x = 0) and the ops' own factor gradient is ∂L/∂P = dYᵀ X = ∇_W L — on the fused NF4 path as on the plain
one, with no hook and no copy of W. Outside a run (no data: a bare ``inject``, the parameter counts) A and B are
random (kaiming, frozen) and R = 0: LoRA-XS with a random projection, starting at the base.

Training: only R (r² per module) goes through the same fused Functions as SLoRA's B N A (``factors``). Export: the
plain LoRA A, s·B R (rank r), exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import Adapter, AdapterConfig, LowRank, kaiming_uniform_, register


class LoRASBConfig(AdapterConfig):
    kind: Literal["lora_sb"] = "lora_sb"
    init_batches: int = Field(4, ge=1, description="Micro-batches whose summed gradient estimates the first update.")
    init_lr: float | None = Field(
        None, gt=0, description="η of ΔW₀ = −η·sign(∇W L), the first AdamW step; None = train.lr. The public code "
        "uses the first warm-up step's lr, train.lr / (warmup_ratio · steps): set it when training warms up."
    )
    estimate_mib: int = Field(
        1024, gt=0, description="Memory for the gradient estimate: modules are estimated in groups whose fp32 "
        "gradients fit in it, one pass over the init batches per group."
    )


@register
class LoRASB(Adapter):
    kind = "lora_sb"
    Config = LoRASBConfig
    description = "LoRA-SB: W + s·B R A, A and B from the SVD of the first full-gradient update, only r×r R trains"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device, r = base_layer.weight.device, config.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device), requires_grad=False)  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device), requires_grad=False)  # (out, r)
        self.lorasb_R = nn.Parameter(torch.zeros(r, r, device=device))  # (r, r)
        self.register_buffer("lorasb_from_data", torch.zeros((), dtype=torch.bool, device=device))
        self._probe: torch.Tensor | None = None  # (out, in) while the gradient is estimated
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_uniform_(self.lora_A)
            kaiming_uniform_(self.lora_B)
            self.lorasb_R.zero_()
            self.lorasb_from_data.fill_(False)

    def trainable_names(self) -> list[str]:
        return ["lorasb_R"]

    def factors(self) -> LowRank:
        if self._probe is not None:
            p = self._probe
            if self.in_features <= self.out_features:  # (out, in) probe as B, A = I_in: ∂L/∂B = dYᵀ X
                return LowRank(A=torch.eye(self.in_features, dtype=p.dtype, device=p.device), B=p, scale=1.0)
            return LowRank(A=p, B=torch.eye(self.out_features, dtype=p.dtype, device=p.device), scale=1.0)
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, mid=self.lorasb_R)

    def estimate_bytes(self) -> int:
        """fp32 bytes the gradient estimate of this module holds: the probe, its gradient and the identity."""
        k = min(self.in_features, self.out_features)
        return 4 * (2 * self.out_features * self.in_features + k * k)

    def set_from_update(self, update: torch.Tensor) -> None:
        """B, A, R from the rank-r truncated SVD of ``update`` (out, in): s·B R A = [update]_r."""
        r = self.config.rank
        u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)  # descending singular values
        k = min(r, s.shape[0])
        with torch.no_grad():
            self.lora_B.zero_()
            self.lora_A.zero_()
            self.lorasb_R.zero_()
            self.lora_B[:, :k].copy_(u[:, :k])
            self.lora_A[:k].copy_(vh[:k])
            self.lorasb_R[:k, :k].copy_(torch.diag(s[:k]) / self.scale)
            self.lorasb_from_data.fill_(True)

    @classmethod
    def init_from_data(cls, adapters: list[Adapter], model: nn.Module, batches: Iterable[dict],
                       loss_fn: Callable[[nn.Module, dict], torch.Tensor], lr: float) -> None:
        """Estimate every module's gradient over the first ``init_batches`` batches, group by group, and set each
        module's A, B, R from −η·sign(G). Adapters already initialised from data (a loaded one) are skipped."""
        todo = [a for a in adapters if isinstance(a, LoRASB) and not bool(a.lorasb_from_data)]
        if not todo:
            return
        cfg = todo[0].config
        eta = cfg.init_lr or lr
        batches = list(itertools.islice(batches, cfg.init_batches))
        was_training = model.training
        model.train()
        for group in _groups(todo, cfg.estimate_mib * 2**20):
            for a in group:
                a._probe = torch.zeros(a.out_features, a.in_features, device=a.lora_A.device, requires_grad=True)
            try:
                for b in batches:
                    loss_fn(model, b).backward()
                for a in group:
                    a.set_from_update(-eta * torch.sign(a._probe.grad))
            finally:
                for a in group:
                    a._probe = None
                model.zero_grad(set_to_none=True)
        model.train(was_training)


def _groups(adapters: list[LoRASB], budget: int) -> list[list[LoRASB]]:
    """Consecutive modules whose estimate fits ``budget`` bytes together (a module larger than it goes alone)."""
    groups: list[list[LoRASB]] = []
    used = budget + 1
    for a in adapters:
        need = a.estimate_bytes()
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(a)
        used += need
    return groups
