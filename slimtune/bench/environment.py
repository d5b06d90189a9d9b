"""What a benchmark ran on: the device, the library versions, the git commit (the ``environment`` of a report)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return f"CPU: {m.group(1).strip()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    for pkg in ("torch", "triton", "bitsandbytes", "transformers", "peft"):
        env[pkg] = _version(pkg)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env
