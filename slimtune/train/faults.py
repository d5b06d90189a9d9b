"""Fault injection for the reliability tests (DESIGN.md §7), driven by the SLIMTUNE_FAULT environment variable.

``nan@K``: the loss of optimizer step K becomes NaN. ``oom@K``: step K raises a CUDA-style out-of-memory error.
``kill_ckpt@K``: the process is killed with SIGKILL in the middle of writing the checkpoint of step K.
Unset (the normal case), every hook here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal

import torch

from slimtune.errors import ResourceError


def _fault(kind: str) -> int | None:
    spec = os.environ.get("SLIMTUNE_FAULT", "")
    for part in spec.split(","):
        name, _, step = part.partition("@")
        if name.strip() == kind and step.strip().isdigit():
            return int(step)
    return None


def maybe_corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if _fault("nan") == step else loss


def maybe_kill_during_checkpoint(step: int) -> None:
    if _fault("kill_ckpt") == step:
        os.environ["SLIMTUNE_KILL_IN_WRITE"] = "1"


def kill_now_if_requested() -> None:
    """Called by the checkpoint writer after its first file: simulates a power cut mid-write."""
    if os.environ.get("SLIMTUNE_KILL_IN_WRITE") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def oom_guard(step: int, device: torch.device, recipe=None):
    """Turn an out-of-memory error during a step into a ResourceError (exit code 3) with what to lower."""
    try:
        if _fault("oom") == step:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by SLIMTUNE_FAULT)")
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ResourceError(
            f"out of memory at step {step} ({str(e).splitlines()[0]}); {_estimate_line(recipe, device)}lower "
            "train.micro_batch (raise train.grad_accum to keep the batch) or data.max_seq_len, or set "
            "train.grad_checkpointing: full|offload, train.optimizer: adamw8bit, quant.mode: nf4 — "
            "`slimtune estimate RECIPE` shows what fits"
        ) from None


def _estimate_line(recipe, device: torch.device) -> str:
    """The estimator's figures for this recipe on this GPU ("estimated peak X GiB of Y GiB, longest fitting
    sequence N tokens; "), or "" when the estimator cannot say (no ``estimate_for_recipe``, no recipe, a failure)."""
    if recipe is None:
        return ""
    try:
        from slimtune.bench import estimate as est_mod

        fn = getattr(est_mod, "estimate_for_recipe", None)
        if fn is None:
            return ""
        gib = None
        if device.type == "cuda":
            gib = torch.cuda.get_device_properties(device).total_memory / est_mod.GiB
        try:
            est = fn(recipe, gpu_mem_gib=gib)
        except TypeError:
            est = fn(recipe)
        parts = [f"estimated peak {est.total_bytes / est_mod.GiB:.2f} GiB"
                 + (f" of {gib:.1f} GiB" if gib else "")]
        if gib:
            parts.append(f"longest sequence that fits at this micro_batch: {est.max_seq_len_that_fits(gib)} tokens")
        return ", ".join(parts) + "; "
    except Exception:  # the message must never fail: fall back to naming the command
        return ""
