"""Backend selection: auto / forced / env override / errors."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.ops import dispatch
from slimtune.ops.dispatch import get_backend, resolve_backend, set_backend, use_backend


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_KERNELS", raising=False)
    old = dispatch._mode
    yield
    dispatch._mode = old


def test_auto_picks_torch_on_cpu():
    set_backend("auto")
    assert resolve_backend(torch.zeros(1)) == "torch"


def test_forced_modes(monkeypatch):
    x = torch.zeros(1)
    set_backend("torch")
    assert resolve_backend(x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_backend("triton")
    assert resolve_backend(x) == "triton"
    assert resolve_backend(x, "torch") == "torch"  # the per-call argument wins


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SlimtuneError, match="CUDA"):
        resolve_backend(torch.zeros(1), "triton")


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_ok", False)
    with pytest.raises(SlimtuneError, match="not installed"):
        resolve_backend(torch.zeros(1), "triton")
    assert resolve_backend(torch.zeros(1), "auto") == "torch"


def test_env_overrides_set_backend(monkeypatch):
    set_backend("triton")
    monkeypatch.setenv("SLIMTUNE_KERNELS", "torch")
    assert get_backend() == "torch" and resolve_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("SLIMTUNE_KERNELS", "fast")
    with pytest.raises(SlimtuneError, match="SLIMTUNE_KERNELS"):
        resolve_backend(torch.zeros(1))


def test_bad_mode_and_context_manager():
    with pytest.raises(SlimtuneError):
        set_backend("cuda")
    set_backend("auto")
    with use_backend("torch"):
        assert get_backend() == "torch"
    assert get_backend() == "auto"
    err = None
    try:
        set_backend("x\ny")
    except SlimtuneError as e:
        err = str(e)
    assert err is not None and "\n" not in err
