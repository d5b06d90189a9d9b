"""Held-out evaluation of a preference objective (`train.eval_every` on `data.val_split` / `eval_sources` pairs):
the mean loss and the objective's metrics — preference (reward) accuracy and reward margin — under no_grad."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimtune.data.preference import collate_pairs, collate_unpaired
from slimtune.objectives.base import Objective


def evaluate_objective(objective: Objective, model: nn.Module, records: list[dict[str, Any]], *, pad_id: int,
                       batch_size: int, device: torch.device) -> dict[str, Any]:
    """{"loss", "examples", and the objective's metrics (rewards/accuracies, rewards/margins, ...)} over
    ``records`` (paired or KTO examples, as `data.holdout` holds them)."""
    collate = collate_pairs if "chosen_input_ids" in records[0] else collate_unpaired
    objective.pop_metrics()
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for s in range(0, len(records), batch_size):
                b = {k: v.to(device) for k, v in collate(records[s:s + batch_size], pad_id).items()}
                total += float(objective.loss_sum(model, b))
                n += objective.count(b)
    finally:
        model.train(was)
    return {"loss": total / max(n, 1), "examples": n, **objective.pop_metrics()}
