"""Activation memory, measured without a GPU: the bytes autograd saves for backward.

``saved_bytes(fn)`` runs ``fn()`` under ``torch.autograd.graph.saved_tensors_hooks`` and records every tensor that
an op (or a custom autograd Function's ``save_for_backward``) saves. Counting rules:

* tensors are deduplicated by storage: a saved view keeps its whole storage alive, so each distinct storage is
  counted once, at its full size (``untyped_storage().nbytes()``), however many times and through however many
  views it is saved;
* storages that belong to parameters or buffers of the ``modules`` passed in (weights, frozen NF4 codes, LoRA
  factors) are counted apart, in ``param_bytes``: they exist whether or not a backward pass follows, so they are
  not activation memory. Without ``modules`` everything counts as activation;
* what a Function keeps as a plain attribute on ``ctx`` instead of ``save_for_backward`` is invisible to the hooks
  (bitsandbytes' 4-bit matmul keeps its weight that way, which is a parameter anyway).

The pack hook returns the tensor itself, so every recorded storage stays alive until the graph is freed and no
two recorded storages can share an address.

``per_token_per_layer`` turns two such measurements into bytes per token per decoder layer: the same model built
with L and 2L decoder layers, run on the same tokens; the difference holds exactly L layers' worth of saved
tensors, and every per-model term (embedding output, final norm, loss/logits, the rotary cos/sin shared by all
layers) cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class SavedBytes:
    """What one forward pass saved for backward."""

    activation_bytes: int  # distinct storages that are not parameters/buffers of the given modules
    param_bytes: int  # distinct storages of parameters/buffers of the given modules
    n_saved: int  # number of pack-hook calls (before deduplication)
    n_storages: int  # distinct storages counted (both kinds)
    by_shape: dict[str, int] = field(default_factory=dict)  # "dtype(shape)" -> activation bytes, for reading

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.param_bytes


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def saved_bytes(fn: Callable[[], Any], *, modules: Iterable[nn.Module] = ()) -> SavedBytes:
    """Run ``fn()`` (a forward pass building an autograd graph) and count the bytes saved for backward.

    The graph ``fn`` builds is dropped on return (call backward inside ``fn`` if it should run). Parameters and
    buffers of ``modules`` are counted in ``param_bytes`` and excluded from ``activation_bytes``.
    """
    param_keys: set[tuple[str, int]] = set()
    for m in modules:
        for p in list(m.parameters()) + list(m.buffers()):
            if p.numel():
                param_keys.add(_storage_key(p))
            qs = getattr(p, "quant_state", None)  # bitsandbytes: absmax & co. are frozen model state too
            for q in _quant_state_tensors(qs):
                param_keys.add(_storage_key(q))

    seen: dict[tuple[str, int], int] = {}
    kinds: dict[tuple[str, int], bool] = {}
    shapes: dict[str, int] = {}
    calls = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if t.numel() == 0 or t.layout != torch.strided:
            return t
        key = _storage_key(t)
        if key not in seen:
            n = t.untyped_storage().nbytes()
            seen[key] = n
            kinds[key] = key in param_keys
            if not kinds[key]:
                label = f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"
                shapes[label] = shapes.get(label, 0) + n
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    del out
    act = sum(n for k, n in seen.items() if not kinds[k])
    par = sum(n for k, n in seen.items() if kinds[k])
    return SavedBytes(act, par, calls, len(seen), dict(sorted(shapes.items(), key=lambda kv: -kv[1])))


def _quant_state_tensors(qs: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    while qs is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if torch.is_tensor(t) and t.numel():
                out.append(t)
        qs = getattr(qs, "state2", None)
    return out


def per_token_per_layer(
    measure: Callable[[int], SavedBytes], *, layers: int, tokens: int
) -> float:
    """Activation bytes per token per decoder layer from ``measure(L)`` and ``measure(2L)``.

    ``measure(n)`` must build the model with ``n`` decoder layers and run one forward pass on ``tokens`` tokens
    under :func:`saved_bytes`. Returns (bytes(2L) − bytes(L)) / (L · tokens).
    """
    one = measure(layers).activation_bytes
    two = measure(2 * layers).activation_bytes
    return (two - one) / (layers * tokens)
