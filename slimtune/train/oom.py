"""Out of memory during a training step → one ``ResourceError`` line (exit code 3) that says what to lower."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from slimtune.errors import ResourceError

ADVICE = ("lower train.micro_batch (raise train.grad_accum to keep the batch) or data.max_seq_len, or set "
          "train.grad_checkpointing: full|offload, train.optimizer: adamw8bit, quant.mode: nf4 — "
          "`slimtune estimate RECIPE` shows what fits")


@contextlib.contextmanager
def oom_guard(step: int, device: torch.device, hints: Callable[[BaseException], list[str]] | None = None
              ) -> Iterator[None]:
    """Turn ``torch.OutOfMemoryError`` raised in the block into a ``ResourceError`` naming ``step``.

    ``hints(error)`` may add sentences (the CLI adds the estimator's figures through a trainer callback); a hint
    that fails is left out: the message itself must never fail.
    """
    try:
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        extra = ""
        if hints is not None:
            try:
                extra = "".join(f"{h}; " for h in hints(e) if h)
            except Exception:
                extra = ""
        raise ResourceError(f"out of memory at step {step} ({str(e).splitlines()[0]}); {extra}{ADVICE}") from None
