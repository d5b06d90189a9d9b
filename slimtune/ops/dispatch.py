"""Backend selection for the fused ops: Triton kernels or the plain-torch reference.

Every public op takes ``backend=None`` and asks :func:`resolve_backend` which path to run, once per call, from
the tensor it is about to process. Nothing here branches on the device or on versions at import time.

Precedence (first that is set wins):

1. the op's ``backend=`` argument (``"triton"`` / ``"torch"``);
2. the environment variable ``SLIMTUNE_KERNELS`` (``auto`` | ``triton`` | ``torch``), read at each call;
3. :func:`set_backend` (process-wide; default ``"auto"``).

``auto`` picks Triton when the tensor lives on a CUDA device and ``triton`` is importable, else torch.
Forcing ``triton`` for a CPU tensor is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``), which is
how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

import torch

from slimtune.errors import SlimtuneError

Mode = Literal["auto", "triton", "torch"]
Backend = Literal["triton", "torch"]

ENV_VAR = "SLIMTUNE_KERNELS"
_MODES = ("auto", "triton", "torch")
_mode: str = "auto"
_triton_ok: bool | None = None


def _check_mode(mode: str, where: str) -> str:
    m = str(mode).strip().lower()
    if m not in _MODES:
        raise SlimtuneError(f"{where}: unknown kernel backend {mode!r}; expected one of auto, triton, torch")
    return m


def set_backend(mode: Mode) -> None:
    """Choose the process-wide backend: ``"auto"`` (default), ``"triton"`` or ``"torch"``."""
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


def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once, lazily)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            _triton_ok = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _triton_ok = False
    return _triton_ok


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> Backend:
    """``"triton"`` or ``"torch"`` for an op about to run on ``x``.

    Raises :class:`SlimtuneError` when Triton is forced but cannot run (not installed, or a CPU tensor without
    ``TRITON_INTERPRET=1``).
    """
    mode = _check_mode(backend, "backend argument") if backend is not None else get_backend()
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if (x.is_cuda and triton_available()) else "torch"
    # forced triton
    if not triton_available():
        raise SlimtuneError(f"kernel backend 'triton' requested ({ENV_VAR} / set_backend) but triton is not installed")
    if not x.is_cuda and not interpreter_on():
        raise SlimtuneError(
            f"kernel backend 'triton' requested for a tensor on {x.device}; Triton kernels need a CUDA device "
            "(or TRITON_INTERPRET=1 for the slow interpreter); use backend 'auto' or 'torch'"
        )
    return "triton"
