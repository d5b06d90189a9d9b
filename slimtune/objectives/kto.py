"""KTO (Ethayarajh et al. 2024, eq. 7) on unpaired `data.format: kto` examples.

With r = π − ρ the policy/reference log-ratio of an example's completion and z₀ the reference point
max(0, mean over the batch's KL rows of (π − ρ)) (each example's prompt with the completion of the example before
it in the data, under no_grad, as TRL estimates it; 0 for a batch without KL rows):

    desirable (label true):    λ_D · (1 − σ(β(r − z₀)))
    undesirable (label false): λ_U · (1 − σ(β(z₀ − r)))

The step averages over the examples. Metrics (TRL's): rewards/chosen and rewards/rejected (β·r, means over the step's
examples of each label), rewards/margins (their difference, when both labels occurred), kl (z₀, mean over the
micro-batches).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.config.objective import PreferenceConfig
from slimtune.objectives.base import Objective
from slimtune.objectives.logprobs import completion_logps, reference_logps


def kto_losses(cfg: PreferenceConfig, policy: torch.Tensor, ref: torch.Tensor, label: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), rewards β·r (B,) detached) from per-example log-prob sums, labels (B,) bool and z₀ (0-dim)."""
    beta = cfg.beta_for("kto")
    r = policy - ref.to(policy.dtype)
    kl = kl.to(policy.dtype)
    desirable = cfg.desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    undesirable = cfg.undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(label, desirable, undesirable), (beta * r).detach()


class KTO(Objective):
    name = "kto"
    uses_reference = True

    def __init__(self, cfg: PreferenceConfig):
        super().__init__()
        self.cfg = cfg

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def _kl(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "kl_input_ids" not in batch:
            return torch.zeros((), device=batch["input_ids"].device)
        ids, labels, mask = batch["kl_input_ids"], batch["kl_labels"], batch["kl_attention_mask"]
        ref = batch["ref_kl_logps"].to(ids.device) if "ref_kl_logps" in batch else reference_logps(model, ids,
                                                                                                   labels, mask)
        with torch.no_grad():
            pol = completion_logps(model, ids, labels, mask).sums
        return (pol.double() - ref.double()).mean().clamp(min=0).float()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        label = batch["kto_label"].to(ids.device)
        kl = self._kl(model, batch)
        ref = batch["ref_logps"].to(ids.device) if "ref_logps" in batch else reference_logps(model, ids, labels,
                                                                                               mask)
        pol = completion_logps(model, ids, labels, mask)
        losses, rewards = kto_losses(self.cfg, pol.sums, ref, label, kl)
        self._record(1, **{"chosen_sum": torch.where(label, rewards, 0.0), "n_chosen": label.double(),
                           "rejected_sum": torch.where(label, 0.0, rewards), "n_rejected": (~label).double(),
                           "kl": kl})
        return losses.sum()

    def pop_metrics(self) -> dict[str, float]:
        m = super().pop_metrics()  # means over micro-batches: the ratios below are unaffected
        out = {"kl": m.get("kl", 0.0)}
        for side in ("chosen", "rejected"):
            if m.get(f"n_{side}"):
                out[f"rewards/{side}"] = m[f"{side}_sum"] / m[f"n_{side}"]
        if len(out) == 3:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
