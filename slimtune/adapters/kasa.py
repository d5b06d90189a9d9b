"""KaSA (Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models").

The base's r smallest singular directions are truncated (the "noisy or irrelevant knowledge"), and the update is in
SVD form with trainable, knowledge-aware singular values:

    W = U Σ Vᵀ (SVD of the dequantized base, k = min(out, in))
    W_base = W − U_b Σ_b V_bᵀ                  b = the last r singular triplets (the smallest)
    y = W_base x + s · ΔU diag(Δσ) ΔVᵀ x       ΔU = B (out, r) zero, ΔVᵀ = A (r, in) kaiming, Δσ ~ N(0, 1)

Loss: L_task + (β·Σ_m ‖Δσ_m‖² + γ·Σ_m (‖ΔU_mᵀΔU_m − I_r‖_F + ‖ΔV_mᵀΔV_m − I_r‖_F)) / M over the M adapted modules
(``regularization``; β = ``beta``, γ = ``gamma``, the public code's defaults 1e-4 and 1e-3). As the public code: the
squared L2 norm of the singular values, the Frobenius norm (not squared) of the orthogonality residuals, the mean
over modules. Unlike it, the Gram matrices are the paper's r × r ΔUᵀΔU and ΔVᵀΔV (the code forms the out × out and
in × in products B Bᵀ and Aᵀ A, which have rank r and can never reach I), and the truncation removes r triplets of
min(out, in) (the code keeps ``in_features − r``, which removes fewer when out < in).

The base is never rewritten (a 4-bit base would be re-quantized): the adapter subtracts U_b Σ_b V_bᵀ itself, so
the module's update is one low-rank term of rank 2r, written for the fused ops as

    s · [−U_bΣ_b / s, ΔU] · blockdiag(I_r, diag(Δσ)) · [V_bᵀ; ΔVᵀ]

(``factors``: the same fused 4-bit Functions as SLoRA's B N A). U_bΣ_b and V_bᵀ are frozen buffers computed once
from the (dequantized) base and saved with the adapter (a load never recomputes the SVD). The model does not start
at the base (the truncation is the method); the PEFT export is the rank-2r LoRA [−U_bΣ_b, s·ΔU diag(Δσ)]·[V_bᵀ; ΔVᵀ]
relative to the original base, exact.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import Adapter, AdapterConfig, LowRank, dense_weight, kaiming_uniform_, register
from slimtune.adapters.inject import loading_saved


class KaSAConfig(AdapterConfig):
    kind: Literal["kasa"] = "kasa"
    beta: float = Field(1e-4, ge=0.0, description="Weight of Σ‖Δσ‖² (knowledge-aware singular values) in the loss.")
    gamma: float = Field(1e-3, ge=0.0, description="Weight of the orthogonality residuals ‖ΔUᵀΔU − I‖ + ‖ΔVᵀΔV − I‖.")


def smallest_triplets(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_bΣ_b (out, r), V_bᵀ (r, in)) of the r smallest singular triplets of w (out, in), fp32.

    A full SVD (the smallest triplets have no randomized shortcut): in fp64 up to min(out, in) = 1024, in fp32 on
    the weight's device above (an 8B model's 4096 × 14336 layers: fp64 would take minutes each)."""
    k = min(w.shape)
    if r > k:
        raise ValueError(f"KaSA truncates rank ≤ min(out, in) = {k} singular directions, got rank {r}")
    u, s, vh = torch.linalg.svd(w.double() if k <= 1024 else w.float(), full_matrices=False)  # descending
    return (u[:, k - r :] * s[k - r :]).float(), vh[k - r :].float()


@register
class KaSA(Adapter):
    kind = "kasa"
    Config = KaSAConfig
    description = "KaSA: base minus its r smallest singular triplets + s·ΔU diag(Δσ) ΔVᵀ, with orthogonality/L2 loss"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device, r = base_layer.weight.device, config.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in) ΔVᵀ
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # (out, r) ΔU
        self.kasa_sigma = nn.Parameter(torch.empty(r, device=device))  # (r,) Δσ
        self.register_buffer("kasa_US", torch.zeros(self.out_features, r, device=device))  # (out, r) U_bΣ_b
        self.register_buffer("kasa_Vh", torch.zeros(r, self.in_features, device=device))  # (r, in) V_bᵀ
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_uniform_(self.lora_A)
            self.lora_B.zero_()
            self.kasa_sigma.normal_()
            if loading_saved() or self.lora_A.device.type == "meta":  # saved buffers follow / shapes only
                return
            w = dense_weight(self.base_layer)  # (out, in) fp32, dequantized for a 4-bit base; freed below
            us, vh = smallest_triplets(w, self.config.rank)
            del w
            self.kasa_US.copy_(us)
            self.kasa_Vh.copy_(vh)

    def trainable_names(self) -> list[str]:
        return ["lora_A", "lora_B", "kasa_sigma"]

    def factors(self) -> LowRank:
        s, r = self.scale, self.config.rank
        dt = self.lora_A.dtype
        eye = torch.eye(r, dtype=dt, device=self.lora_A.device)
        return LowRank(
            A=torch.cat([self.kasa_Vh.to(dt), self.lora_A], dim=0),  # (2r, in)
            B=torch.cat([self.kasa_US.to(dt) * (-1.0 / s), self.lora_B], dim=1),  # (out, 2r)
            mid=torch.block_diag(eye, torch.diag(self.kasa_sigma)),  # (2r, 2r)
            scale=s,
        )

    def penalties(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖Δσ‖², ‖ΔUᵀΔU − I_r‖_F + ‖ΔVᵀΔV − I_r‖_F) of this module, fp32, differentiable."""
        a, b, sig = self.lora_A.float(), self.lora_B.float(), self.kasa_sigma.float()
        eye = torch.eye(self.config.rank, device=a.device)
        orth = torch.linalg.matrix_norm(b.t() @ b - eye) + torch.linalg.matrix_norm(a @ a.t() - eye)
        return (sig * sig).sum(), orth

    @classmethod
    def regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        """(β Σ‖Δσ‖² + γ Σ orthogonality residuals) / M, added to the step's loss by the trainer."""
        if not adapters:
            return None
        cfg = adapters[0].config
        l2, orth = zip(*(a.penalties() for a in adapters))
        return (cfg.beta * torch.stack(l2).sum() + cfg.gamma * torch.stack(orth).sum()) / len(adapters)
