"""`slimtune doctor`: versions, GPU, fused-kernel readiness, what is missing; always exit code 0."""

from __future__ import annotations

import importlib.metadata

import torch
from typer.testing import CliRunner

from slimtune import doctor
from slimtune.cli import app


def test_doctor_table_exit_0():
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    for word in ("slimtune doctor", "python", "torch", "triton", "bitsandbytes", "transformers", "peft",
                 "CUDA device", "GPU memory free", "fused kernels", "kernel backend"):
        assert word in res.output, (word, res.output)
    assert torch.__version__ in res.output
    if not torch.cuda.is_available():
        assert "none" in res.output and "auto → torch" in res.output
        assert "missing:" in res.output


def test_diagnose_reports_missing_packages(monkeypatch):
    real = importlib.metadata.version

    def version(dist):
        if dist in ("triton", "peft"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    report = doctor.diagnose()
    assert report.value("triton") == "not installed" and report.value("peft") == "not installed"
    assert report.value("fused kernels").startswith("no (triton: not installed")
    assert any(m.startswith("triton: not installed") for m in report.missing)
    assert any(m.startswith("peft: not installed") for m in report.missing)
    assert report.value("torch") == real("torch")


def test_doctor_survives_a_bad_backend_setting(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_KERNELS", "bogus")
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "unknown kernel backend" in " ".join(res.output.split())
