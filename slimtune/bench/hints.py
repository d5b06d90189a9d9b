"""The estimator's figures in the trainer's out-of-memory message (a ``TrainerCallback`` the CLI registers).

The trainer sits below the estimator in the layering (``bench → loram → train``), so it cannot ask the estimator
itself; ``slimtune run`` adds ``EstimateOnOOM()`` to the trainer's callbacks and the OOM line then reads
"estimated peak X GiB of Y GiB, longest sequence that fits at this micro_batch: N tokens".
"""

from __future__ import annotations

import torch

from slimtune.bench import estimate as est_mod
from slimtune.bench.recipe_estimate import estimate_for_recipe
from slimtune.train.callbacks import TrainerCallback


def estimate_line(recipe, device: torch.device) -> str:
    """"estimated peak X GiB[ of Y GiB], longest sequence that fits at this micro_batch: N tokens" for ``recipe``
    on ``device`` (the GPU's size only on CUDA)."""
    gib = torch.cuda.get_device_properties(device).total_memory / est_mod.GiB if device.type == "cuda" else None
    est = estimate_for_recipe(recipe, gpu_mem_gib=gib)
    parts = [f"estimated peak {est.total_bytes / est_mod.GiB:.2f} GiB" + (f" of {gib:.1f} GiB" if gib else "")]
    if gib:
        parts.append(f"longest sequence that fits at this micro_batch: {est.max_seq_len_that_fits(gib)} tokens")
    return ", ".join(parts)


class EstimateOnOOM(TrainerCallback):
    """Adds ``estimate_line`` for the trainer's recipe to its out-of-memory error."""

    def on_oom(self, trainer, error: BaseException) -> str | None:
        return estimate_line(trainer.recipe, trainer.device)
