"""The weights generation: a process-wide count of the updates of trainable weights.

Values derived from trainable weights and cached between calls (DoRA's row norm ‖W + s·B A‖, in the fused ops and
in the DoRA module) must be recomputed after every optimizer step. A key made of the tensors' storage and version
counters does not see every step:

* bitsandbytes' 8-bit / paged AdamW write the parameters through raw pointers (CUDA) or ``p.data.copy_`` (CPU):
  the version counter stays where it was;
* FSDP2 all-gathers the updated shards into the same unsharded parameters under
  ``_unsafe_preserve_version_counter``: same object, same version, often the same block of memory.

So ``slimtune.train.loop.Trainer`` calls :func:`weights_changed` after every optimizer step and after loading
weights into the model (a resume), and every such cache keys on :func:`weights_generation` as well. Code that steps
its own optimizer over slimtune's adapters outside the Trainer calls :func:`weights_changed` after each step.
"""

from __future__ import annotations

__all__ = ["weights_changed", "weights_generation"]

_generation = 0


def weights_generation() -> int:
    """How many times the trainable weights were declared changed in this process (a cache key component)."""
    return _generation


def weights_changed() -> None:
    """Declare that trainable weights changed (an optimizer step, a load): caches derived from them are stale."""
    global _generation
    _generation += 1
