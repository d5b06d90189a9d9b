"""Paired preference objectives on one (2B, T) forward of B chosen and B rejected sequences.

With π the policy's and ρ the reference's summed completion log-probs, n the completion lengths, σ the logistic
function, ε ``label_smoothing`` and Δ = (π_c − ρ_c) − (π_r − ρ_r):

- DPO (Rafailov et al. 2023; cDPO with ε):  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); rewards β(π − ρ).
- IPO (Azar et al. 2023), length-normalised as TRL and the authors do:  ((π_c−ρ_c)/n_c − (π_r−ρ_r)/n_r − 1/(2β))².
- SimPO (Meng et al. 2024), no reference:  −(1−ε)·log σ(β(π̄_c − π̄_r) − γ) − ε·log σ(−(…)), π̄ = π/n (or π with
  ``length_normalize: false``); rewards β·π̄.
- ORPO (Hong et al. 2024), no reference:  NLL_c − λ·log σ(log odds_c − log odds_r), odds = p̄/(1−p̄) of the
  per-token mean log-prob p̄ = exp(π/n), NLL_c = −π_c/n_c; rewards λ·π/n.

Metrics (means over the step's pairs): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (the
chosen reward strictly above the rejected one), logps/chosen, logps/rejected — TRL's names and definitions — and
logps/accuracies: the policy itself gives the chosen completion the higher log-prob (meaningful before training,
when every reward is 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.config.objective import PreferenceConfig
from slimtune.objectives.base import Objective
from slimtune.objectives.logprobs import completion_logps, reference_logps


class PairLosses(NamedTuple):
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def pair_losses(kind: str, cfg: PreferenceConfig, pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor,
                n_r: torch.Tensor, ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None
                ) -> PairLosses:
    """Per-pair losses and rewards of ``kind`` from per-sequence log-prob sums (B,) and completion lengths (B,)."""
    beta = cfg.beta_for(kind)
    n_c, n_r = n_c.clamp(min=1).to(pi_c.dtype), n_r.clamp(min=1).to(pi_r.dtype)
    if kind in ("dpo", "ipo"):
        lc, lr = pi_c - ref_c.to(pi_c.dtype), pi_r - ref_r.to(pi_r.dtype)
        if kind == "dpo":
            losses = _smoothed(beta * (lc - lr), cfg.label_smoothing)
        else:
            losses = (lc / n_c - lr / n_r - 1 / (2 * beta)) ** 2
        return PairLosses(losses, (beta * lc).detach(), (beta * lr).detach())
    mc, mr = (pi_c / n_c, pi_r / n_r) if (kind == "orpo" or cfg.length_normalize) else (pi_c, pi_r)
    if kind == "simpo":
        losses = _smoothed(beta * (mc - mr) - cfg.gamma, cfg.label_smoothing)
    elif kind == "orpo":
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        losses = -mc - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown paired objective {kind!r}")
    return PairLosses(losses, (beta * mc).detach(), (beta * mr).detach())


class Paired(Objective):
    """DPO, IPO, SimPO or ORPO (``kind``) over `data.format: preference` batches; the step normalises by pairs."""

    def __init__(self, kind: str, cfg: PreferenceConfig):
        super().__init__()
        self.name, self.cfg = kind, cfg
        self.uses_reference = kind in ("dpo", "ipo")

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[PairLosses, torch.Tensor]:
        """The pair losses of a batch and the policy's per-row log-prob sums (2B,)."""
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        ref = None
        if self.uses_reference:  # first, so no checkpointed recompute ever runs with the adapters off
            ref = batch["ref_logps"].to(ids.device) if "ref_logps" in batch else reference_logps(model, ids, labels,
                                                                                                   mask)
        pol = completion_logps(model, ids, labels, mask)
        B = ids.shape[0] // 2
        pc, pr = pol.sums[:B], pol.sums[B:]
        nc, nr = pol.counts[:B], pol.counts[B:]
        rc, rr = (None, None) if ref is None else (ref[:B], ref[B:])
        return pair_losses(self.name, self.cfg, pc, pr, nc, nr, rc, rr), pol.sums

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out, sums = self.terms(model, batch)
        B = out.losses.shape[0]
        c, r = out.chosen_rewards, out.rejected_rewards
        self._record(B, **{"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                           "rewards/accuracies": (c > r).double(), "logps/chosen": sums[:B],
                           "logps/rejected": sums[B:], "logps/accuracies": (sums[:B] > sums[B:]).double()})
        return out.losses.sum()
