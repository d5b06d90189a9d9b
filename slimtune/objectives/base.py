"""The objective interface: what the Trainer's step asks of ``train.objective``.

    obj = build_objective(recipe.train, loss_fn=causal_lm_loss_sum)
    n = sum(obj.count(b) for b in micro)             # the step's normalising units (tokens, pairs, examples)
    (obj.loss_sum(model, b) / n).backward()           # per micro-batch; the step's loss is Σ loss_sum / n
    metrics = obj.pop_metrics()                       # means over the step's units (rewards, margins, accuracy)
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import torch
import torch.nn as nn


class Objective:
    """One objective. ``count`` and ``loss_sum`` see one micro-batch; metric sums accumulate until
    ``pop_metrics``. ``uses_reference``: whether the loss needs the reference policy's log-probs (stored in the
    batch as "ref_logps", or computed with the adapters off)."""

    name: ClassVar[str]
    uses_reference: ClassVar[bool] = False
    generates: ClassVar[bool] = False  # ``prepare`` samples completions: the Trainer runs it as the "generate" phase

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._units = 0

    def setup(self, trainer) -> None:
        """Called once by the Trainer after its model, tokenizer and data exist (GRPO: the sampling setup)."""

    def prepare(self, trainer, micro: list) -> list:
        """The step's micro-batches as the loss sees them; called at the start of each step when ``generates``
        (GRPO samples and scores completions here). Default: unchanged."""
        return micro

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective (GRPO: rollouts reused over num_iterations steps)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def count(self, batch: dict[str, torch.Tensor]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _record(self, units: int, **sums: torch.Tensor | float) -> None:
        """Add per-unit metric sums of a micro-batch (tensors are summed and detached)."""
        self._units += units
        for k, v in sums.items():
            self._sums[k] += float(v.detach().double().sum()) if torch.is_tensor(v) else float(v)

    def pop_metrics(self) -> dict[str, float]:
        """The metrics since the last call, as means over the units (empty for SFT)."""
        out = {k: v / max(self._units, 1) for k, v in self._sums.items()}
        self._sums.clear()
        self._units = 0
        return out
