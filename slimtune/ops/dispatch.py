"""Backend selection for the fused ops: Triton kernels, dequant + vendor GEMM, or the plain-torch reference.

Every public op takes ``backend=None`` and asks :func:`resolve_backend` which path to run, once per call, from
the tensor it is about to process. Nothing here branches on the device or on versions at import time.

Precedence (first that is set wins):

1. the op's ``backend=`` argument (``"auto"`` / ``"triton"`` / ``"dequant"`` / ``"torch"``);
2. the environment variable ``SLIMTUNE_KERNELS`` (same values), read at each call;
3. :func:`set_backend` (process-wide; default ``"auto"``; ``train.kernels`` in a recipe sets it).

Backends: ``triton`` (fused kernels, slimtune/kernels/), ``dequant`` (the base GEMMs of adapted projections as
"dequantize W into a reused buffer + cuBLAS", slimtune/ops/gemm_dequant.py; ops without base GEMMs run torch for
it), ``torch`` (the readable reference). ``auto``:

* on CUDA, for an op that passes ``op=`` and a ``trial``, measures its candidates on the real inputs at first use
  and keeps the fastest correct one (slimtune/ops/autotune.py: verdicts cached on disk, listed by
  :func:`dispatch_report`); Triton is a candidate only on compute capability >= 8.0 (sm_75 and older fall back,
  with a note in the report). Without a trial: ``dequant`` for GEMM ops, else Triton where allowed, else torch.
* on CPU: ``torch`` (the interpreter is for tests), unless measuring is switched on (:func:`set_measure_on_cpu`
  or ``SLIMTUNE_DISPATCH_MEASURE=1``), which is how the mechanism is tested without a GPU.

Forcing ``triton`` for a CPU tensor is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Literal

import torch

from slimtune.errors import SlimtuneError
from slimtune.ops import autotune
from slimtune.ops.autotune import dispatch_report

__all__ = [
    "BACKENDS",
    "GEMM_BACKENDS",
    "dispatch_report",
    "get_backend",
    "interpreter_on",
    "measures",
    "resolve_backend",
    "set_backend",
    "set_measure_on_cpu",
    "triton_allowed",
    "triton_available",
    "triton_module",
    "triton_on_cpu",
    "use_backend",
]

Mode = Literal["auto", "triton", "dequant", "torch"]
Backend = Literal["triton", "dequant", "torch"]

ENV_VAR = "SLIMTUNE_KERNELS"
MEASURE_ENV = "SLIMTUNE_DISPATCH_MEASURE"
BACKENDS = ("triton", "torch")  # every op
GEMM_BACKENDS = ("triton", "dequant", "torch")  # ops whose work is the base GEMMs of adapted projections
MIN_TRITON_CAPABILITY = (8, 0)  # bf16 tensor-core dots, the shared memory the GEMM tiles are sized for
_MODES = ("auto", "triton", "dequant", "torch")
_mode: str = "auto"
_measure_cpu: bool = False
_cpu_triton: bool = False
_triton_ok: bool | None = None


def _check_mode(mode: str, where: str) -> str:
    m = str(mode).strip().lower()
    if m not in _MODES:
        raise SlimtuneError(f"{where}: unknown kernel backend {mode!r}; expected one of {', '.join(_MODES)}")
    return m


def set_backend(mode: Mode) -> None:
    """Choose the process-wide backend: ``"auto"`` (default), ``"triton"``, ``"dequant"`` or ``"torch"``."""
    global _mode
    _mode = _check_mode(mode, "set_backend")


def get_backend() -> str:
    """The mode in force (the environment variable beats :func:`set_backend`)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_mode(env, f"environment variable {ENV_VAR}")
    return _mode


@contextlib.contextmanager
def use_backend(mode: Mode) -> Iterator[None]:
    """Temporarily set the process-wide mode (tests, benchmarks)."""
    global _mode
    old = _mode
    set_backend(mode)
    try:
        yield
    finally:
        _mode = old


def set_measure_on_cpu(on: bool) -> None:
    """Let ``auto`` measure candidates for CPU tensors too (tests of the mechanism; off by default)."""
    global _measure_cpu
    _measure_cpu = bool(on)


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Let forced ``triton`` take CPU tensors without the interpreter: only for capturing launches ahead of time
    (slimtune/kernels/aot.py records them instead of running them; see slimtune/ops/compile_matrix.py)."""
    global _cpu_triton
    old, _cpu_triton = _cpu_triton, True
    try:
        yield
    finally:
        _cpu_triton = old


def _measure_on_cpu() -> bool:
    return _measure_cpu or os.environ.get(MEASURE_ENV, "0") not in ("", "0")


def measures(device: torch.device | str) -> bool:
    """Whether ``auto`` (if in force) measures candidates for tensors on ``device``: CUDA, or the CPU with
    measuring switched on. The benchmark decides its backends before its measured steps when it does."""
    return get_backend() == "auto" and (torch.device(device).type == "cuda" or _measure_on_cpu())


def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once, lazily)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            _triton_ok = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _triton_ok = False
    return _triton_ok


def triton_module(name: str) -> ModuleType | None:
    """``slimtune.kernels.<name>`` (Triton kernels and launchers), imported on first use; None without triton.

    The one place where ops/ reaches the optional Triton dependency: the torch backend never imports triton.
    """
    if not triton_available():
        return None
    return importlib.import_module(f"slimtune.kernels.{name}")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_allowed(x: torch.Tensor) -> bool:
    """Whether Triton may run on x's device: installed, and a GPU of compute capability >= 8.0 (or the interpreter)."""
    if not triton_available():
        return False
    if not x.is_cuda:
        return interpreter_on()
    cap = torch.cuda.get_device_capability(x.device)
    if cap < MIN_TRITON_CAPABILITY:
        autotune.note(
            f"triton: off on {torch.cuda.get_device_name(x.device)} (sm_{cap[0]}{cap[1]} < sm_80); "
            "the fused kernels need compute capability 8.0+, torch/dequant run instead"
        )
        return False
    return True


def resolve_backend(
    x: torch.Tensor,
    backend: str | None = None,
    *,
    op: str | None = None,
    shape_class: str | None = None,
    trial: Callable[[str], Sequence[torch.Tensor]] | None = None,
    choices: Sequence[str] = BACKENDS,
) -> Backend:
    """The backend (one of `choices`) for an op about to run on ``x``.

    `op`, `shape_class` and `trial` (see `autotune.autograd_trial`) let ``auto`` measure; `choices` are the backends
    the op has (``GEMM_BACKENDS`` for the adapted-projection ops). A forced backend the op lacks runs ``torch``.
    Raises :class:`SlimtuneError` when Triton is forced but cannot run (not installed, or a CPU tensor without
    ``TRITON_INTERPRET=1``).
    """
    mode = _check_mode(backend, "backend argument") if backend is not None else get_backend()
    if mode == "auto":
        return _auto(x, op, shape_class, trial, choices)
    if mode not in choices:
        return "torch"  # e.g. "dequant" for rms_norm: the vendor-library path of an op without GEMMs is torch's
    if mode != "triton":
        return mode
    if not triton_available():
        raise SlimtuneError(f"kernel backend 'triton' requested ({ENV_VAR} / set_backend) but triton is not installed")
    if not x.is_cuda and not interpreter_on() and not _cpu_triton:
        raise SlimtuneError(
            f"kernel backend 'triton' requested for a tensor on {x.device}; Triton kernels need a CUDA device "
            "(or TRITON_INTERPRET=1 for the slow interpreter); use backend 'auto', 'dequant' or 'torch'"
        )
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < MIN_TRITON_CAPABILITY:
        warnings.warn("kernel backend 'triton' forced on a GPU below sm_80: untested there", stacklevel=2)
    return "triton"


def _auto(x, op, shape_class, trial, choices) -> Backend:
    # a cached verdict costs 12.5 us per op call (4.8 us forced; this 2-core CPU): ~6 ms per Llama-3.1-8B step
    if not (x.is_cuda or _measure_on_cpu()):
        return "torch"
    candidates = [c for c in choices if c != "triton" or triton_allowed(x)]
    default = "dequant" if "dequant" in candidates else ("triton" if "triton" in candidates and x.is_cuda else "torch")
    if op is None or trial is None or len(candidates) == 1 or torch.compiler.is_compiling():
        return default
    shape = shape_class or f"{autotune.shape_bucket(x.numel() // max(x.shape[-1], 1))}x{x.shape[-1]}"
    # what the op will run: an evaluation's forward, or forward + backward with or without dX (issue 23: a
    # verdict measured in evaluation was reused for training)
    mode = "eval" if not torch.is_grad_enabled() else ("train+dx" if x.requires_grad else "train")
    return autotune.choose(op, f"{shape}|{mode}", candidates, trial, dtype=x.dtype, device=x.device,
                           default=default)
