"""Helpers shared by the kernel tests (importable because pytest puts this folder on sys.path)."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
