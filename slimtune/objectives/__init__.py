"""What a training step optimises (DESIGN §8): SFT, and the preference objectives DPO (cDPO), IPO, ORPO, SimPO and
KTO. An objective builds nothing of its own model: it scores the batch's completion tokens through the streamed
linear head (`logprobs.completion_logps`) and turns per-sequence log-probs into a loss sum. `build_objective`
picks one from `train.objective`; the Trainer stays one loop."""

from __future__ import annotations

from collections.abc import Callable

from slimtune.config.objective import PAIRED
from slimtune.errors import RecipeError
from slimtune.objectives.base import Objective
from slimtune.objectives.grpo import GRPO
from slimtune.objectives.kto import KTO
from slimtune.objectives.preference import Paired
from slimtune.objectives.reference import prepare_reference
from slimtune.objectives.sft import SFT, causal_lm_loss_sum

__all__ = ["Objective", "build_objective", "causal_lm_loss_sum", "check_format", "prepare_reference"]

DATA_FORMAT = {"sft": ("text", "chat", "instruction"), "kto": ("kto",), "grpo": ("prompt",),
               **{k: ("preference",) for k in PAIRED}}
"""The `data.format`s each objective trains on."""


def check_format(objective: str, data_format: str) -> None:
    """RecipeError unless ``objective`` trains on ``data_format``."""
    if data_format not in DATA_FORMAT[objective]:
        raise RecipeError(f"train.objective: {objective} trains on data.format {' or '.join(DATA_FORMAT[objective])}, "
                          f"not {data_format}")


def build_objective(train, loss_fn: Callable | None = None) -> Objective:
    """The objective of a recipe's `train` section (``loss_fn``: SFT's summed token loss, when not the default)."""
    if train.objective == "sft":
        return SFT(loss_fn) if loss_fn is not None else SFT()
    if train.objective == "grpo":
        return GRPO(train.grpo, seed=train.seed)
    if train.objective == "kto":
        return KTO(train.preference)
    return Paired(train.objective, train.preference)
