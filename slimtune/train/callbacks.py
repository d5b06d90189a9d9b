"""Trainer callbacks: the one way to hook into ``Trainer`` (metric loggers, evaluation during training, tests).

Register an object on a trainer (``trainer.callbacks.append(cb)``) or pass a list (``Trainer(..., callbacks=[cb])``,
``run_recipe(..., callbacks=[cb])``). Subclass ``TrainerCallback`` and override what you need; every method is a
no-op by default and the trainer calls them in registration order:

- ``on_train_start(trainer)``: after the model, data and optimizer are set up and any resume is done, before step 1.
- ``on_step_start(trainer, step)``: before the micro-batches of optimizer step ``step`` (1-based) run; an
  exception raised here counts as raised by the step (``torch.OutOfMemoryError`` → the OOM message, exit code 3).
- ``on_micro_batch_loss(trainer, index, loss_sum)``: the summed token loss of micro-batch ``index`` of the
  current step, before backward; return a tensor to replace it (tests inject a NaN here), or None.
- ``phase(trainer, name)``: a context manager (or None) wrapped around each phase of a step: ``"forward"`` (the
  loss of one micro-batch), ``"backward"`` (its backward), ``"optimizer"`` (clipping, the optimizer and schedule
  step); the benchmark measures peak memory per phase with it.
- ``on_step_end(trainer, result)``: after the optimizer step with the ``StepResult`` (already in metrics.jsonl).
- ``on_checkpoint_write(trainer, tmp_dir)``: in the middle of writing a checkpoint (the weights are in the
  temporary folder, trainer.pt and the COMPLETE marker are not); a crash test kills the process here.
- ``on_checkpoint(trainer, path)``: after a checkpoint was renamed into place.
- ``on_oom(trainer, error)``: the step ran out of memory; return a sentence of advice for the error line, or None.
- ``on_train_end(trainer, summary)``: after ``train()`` built its summary (also after a SIGINT/SIGTERM stop).

The loop only iterates the list: a trainer without callbacks pays nothing but empty loops.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slimtune.ops.dispatch import dispatch_report

if TYPE_CHECKING:  # typing only: the loop imports this module
    from slimtune.train.loop import StepResult, Trainer


class TrainerCallback:
    """Base class: every hook does nothing."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        pass

    def on_micro_batch_loss(self, trainer: Trainer, index: int, loss_sum: torch.Tensor) -> torch.Tensor | None:
        return None

    def phase(self, trainer: Trainer, name: str) -> contextlib.AbstractContextManager | None:
        return None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_checkpoint_write(self, trainer: Trainer, tmp_dir: Path) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_oom(self, trainer: Trainer, error: BaseException) -> str | None:
        return None

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass

    def on_run_end(self, ctx: Any) -> None:
        """The whole run's results are written (every stage); called on every rank before it leaves the process group
        (``ctx``: its ``DistContext``, None when alone). Callbacks given to ``distributed.session`` only."""
        pass


class KernelChoices(TrainerCallback):
    """Logs, once after the first step, every backend `train.kernels: auto` chose for the fused ops and why
    (measured verdicts, cached ones, forced modes, fall-backs): the choices are made on the first step's inputs."""

    def __init__(self) -> None:
        self.done = False

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.done:
            return
        self.done = True
        mode = trainer.recipe.train.kernels
        lines = dispatch_report() or [  # nothing measured: a forced mode, or auto off CUDA
            f"{mode} forced for every op" if mode != "auto" else
            f"auto on {trainer.device.type}: the torch reference for every op (candidates are measured on CUDA only)"]
        for line in lines:
            trainer.reporter.log(f"kernels: {line}")
