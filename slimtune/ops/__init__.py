"""The fused ops: one public function each, Triton or the torch reference chosen per call (see dispatch.py)."""

from slimtune.ops.dispatch import resolve_backend, set_backend, use_backend
from slimtune.ops.linear_ce import linear_cross_entropy
from slimtune.ops.rms_norm import rms_norm
from slimtune.ops.rope import rope

__all__ = ["linear_cross_entropy", "resolve_backend", "rms_norm", "rope", "set_backend", "use_backend"]
