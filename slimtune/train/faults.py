"""Fault injection for the reliability tests (DESIGN.md §7): trainer callbacks that tests register.

``NanLossAt(K)``: the loss of optimizer step K becomes NaN. ``OomAt(K)``: step K raises a CUDA-style
out-of-memory error. ``KillInCheckpointAt(K)``: the process is killed with SIGKILL in the middle of writing the
checkpoint of step K (after the weights, before trainer.pt and the COMPLETE marker).

In-process tests append these to ``trainer.callbacks`` (or pass ``run_recipe(..., callbacks=...)``). Tests that run
``slimtune run`` in a subprocess cannot do that: for them the CLI reads ``SLIMTUNE_FAULT`` (``nan@K``, ``oom@K``,
``kill_ckpt@K``, comma-separated) once at start-up through ``from_env``; the loop itself never looks at it.

Two faults of a process group's end take a rank instead of a step: ``quit_at_end@R`` (rank R exits at once after the
results are written, without leaving the group: a peer that is gone) and ``stall_at_end@R`` (rank R never leaves:
a peer that stopped answering). The other ranks must still end, in bounded time (``distributed.shutdown``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.train.callbacks import TrainerCallback

ENV = "SLIMTUNE_FAULT"


class NanLossAt(TrainerCallback):
    """Every micro-batch loss of optimizer step ``step`` becomes NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_micro_batch_loss(self, trainer, index: int, loss_sum: torch.Tensor) -> torch.Tensor | None:
        return loss_sum * float("nan") if trainer.pos.step + 1 == self.step else None


class OomAt(TrainerCallback):
    """Optimizer step ``step`` raises ``torch.OutOfMemoryError`` before its first micro-batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, trainer, step: int) -> None:
        if step == self.step:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {type(self).__name__})")


class KillInCheckpointAt(TrainerCallback):
    """SIGKILL the process halfway through writing the checkpoint of step ``step`` (a power cut mid-write)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint_write(self, trainer, tmp_dir: Path) -> None:
        if trainer.pos.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class QuitAtEnd(TrainerCallback):
    """Rank ``rank`` exits (code 0) once the run's results are written, without leaving the process group."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_run_end(self, ctx) -> None:
        if ctx is not None and ctx.rank == self.rank:
            os._exit(0)


class StallAtEnd(TrainerCallback):
    """Rank ``rank`` stops answering once the run's results are written (it sleeps until killed)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_run_end(self, ctx) -> None:
        while ctx is not None and ctx.rank == self.rank:
            time.sleep(1.0)


KINDS: dict[str, type[TrainerCallback]] = {"nan": NanLossAt, "oom": OomAt, "kill_ckpt": KillInCheckpointAt,
                                           "quit_at_end": QuitAtEnd, "stall_at_end": StallAtEnd}


def from_spec(spec: str) -> list[TrainerCallback]:
    """``"nan@3,kill_ckpt@5"`` → the fault callbacks it names (an empty spec: none)."""
    out: list[TrainerCallback] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, step = part.partition("@")
        if name.strip() not in KINDS or not step.strip().isdigit():
            raise SlimtuneError(f"{ENV}={spec}: {part!r} is not KIND@STEP with KIND one of {', '.join(KINDS)}")
        out.append(KINDS[name.strip()](int(step)))
    return out


def from_env() -> list[TrainerCallback]:
    """The callbacks ``SLIMTUNE_FAULT`` asks for (read once, by the CLI's ``run``)."""
    return from_spec(os.environ.get(ENV, ""))
