"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def poisoned(monkeypatch):
    """Uninitialised allocations come back NaN-filled: an output element a kernel fails to write stays NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def _empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def _empty_like(*a, **k):
        t = empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", _empty)
    monkeypatch.setattr(torch, "empty_like", _empty_like)
