"""What a training step optimises: `train.objective` and its knobs (`train.preference`).

    train:
      objective: dpo               # sft | dpo | ipo | orpo | simpo | kto
      preference: {beta: 0.1, label_smoothing: 0.0, precompute_reference: false}

`sft` needs `data.format: text|chat|instruction`; dpo/ipo/orpo/simpo need `data.format: preference` (prompt, chosen,
rejected); kto needs `data.format: kto` (prompt, completion, label). See slimtune/objectives/.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Objective = Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"]
PAIRED = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("sft", "orpo", "simpo")
OBJECTIVE_ALIASES = {"cdpo": "dpo", "sigmoid": "dpo"}


class PreferenceConfig(BaseModel):
    """Knobs of the preference objectives (recipe key `train.preference`); each says which objectives read it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    beta: float | None = Field(None, gt=0)
    """β. DPO/KTO: the KL strength (default 0.1); IPO: τ, the target margin is 1/(2τ) (default 0.1); SimPO: the
    reward scale (default 2.0); ORPO: λ, the weight of the odds-ratio term (default 0.1)."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """DPO (cDPO) and SimPO: the probability ε that a pair's labels are flipped; the loss becomes
    −(1−ε)·log σ(z) − ε·log σ(−z)."""

    gamma: float = Field(0.5, ge=0.0)
    """SimPO: the target reward margin γ (the loss is −log σ(β·Δ̄ − γ), Δ̄ the difference of mean log-probs)."""

    length_normalize: bool = True
    """SimPO: rewards are per-token means of the completion log-probs (the paper); false: sums."""

    desirable_weight: float = Field(1.0, gt=0)
    """KTO: λ_D, the weight of the desirable (label true) examples' losses."""

    undesirable_weight: float = Field(1.0, gt=0)
    """KTO: λ_U, the weight of the undesirable (label false) examples' losses."""

    precompute_reference: bool | None = None
    """DPO/IPO/KTO: compute the reference log-probs once over the data before training and store them in the run
    folder (`reference_logps.safetensors`, resumable), so a step runs one model. Default false with an adapter (the
    reference is then the base with the adapters switched off, under no_grad in the same step); full fine-tuning
    needs it (true), as the trained weights are the base."""

    def beta_for(self, objective: str) -> float:
        """β with the objective's default."""
        if self.beta is not None:
            return self.beta
        return {"simpo": 2.0}.get(objective, 0.1)
