"""`slimtune doctor`: what this machine can run, as data (the CLI renders it as a table).

    report = diagnose()
    for check in report.checks: print(check.name, check.value, check.ok)
    report.missing    # one line per thing that is absent and what that costs

Nothing here downloads, compiles or allocates more than a few bytes; every probe that can fail is caught and
reported as a value, so the command always finishes (exit code 0).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field

# (distribution, required): required packages are needed to train at all; the others for some features.
PACKAGES = (
    ("torch", True),
    ("triton", False),
    ("bitsandbytes", True),
    ("transformers", True),
    ("peft", False),
    ("datasets", False),
    ("safetensors", True),
    ("gguf", False),
    ("sacrebleu", False),
)
WHAT_FOR = {
    "triton": "fused Triton kernels (the torch reference runs instead)",
    "bitsandbytes": "4-bit (nf4/fp4) bases and 8-bit optimizers",
    "peft": "loading exported adapters with PeftModel (tests, interop)",
    "datasets": "hub: data sources",
    "gguf": "GGUF bases",
    "sacrebleu": "BLEU/chrF evaluation",
}


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def value(self, name: str) -> str | None:
        return next((c.value for c in self.checks if c.name == name), None)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else its error as one line."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot use it"
        return " ".join(f"{type(e).__name__}: {e}".split())[:160]
    return None


def diagnose() -> Report:
    rep = Report()
    rep.checks.append(Check("python", platform.python_version()))
    for dist, required in PACKAGES:
        ver = _version(dist)
        if ver is None:
            rep.checks.append(Check(dist, "not installed", ok=not required))
            rep.missing.append(f"{dist}: not installed" + (f" — needed for {WHAT_FOR[dist]}" if dist in WHAT_FOR
                                                           else " — required"))
        else:
            rep.checks.append(Check(dist, ver))

    cuda_ok = False
    try:
        import torch

        cuda_ok = torch.cuda.is_available()
        if cuda_ok:
            free, total = torch.cuda.mem_get_info(0)
            name = torch.cuda.get_device_name(0)
            rep.checks.append(Check("CUDA device", f"{name} (CUDA {torch.version.cuda})"))
            rep.checks.append(Check("GPU memory free", f"{free / 1024**3:.1f} of {total / 1024**3:.1f} GiB"))
        else:
            rep.checks.append(Check("CUDA device", "none", ok=False))
            rep.checks.append(Check("GPU memory free", "none", ok=False))
            rep.missing.append("CUDA device: none — training runs on the CPU (slow), the fused kernels use the "
                               "torch reference")
    except Exception as e:  # noqa: BLE001
        rep.checks.append(Check("CUDA device", f"unknown ({type(e).__name__}: {e})", ok=False))

    triton_err = _import_error("triton") if _version("triton") else "not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if triton_err is not None:
        kernels, ok = f"no (triton: {triton_err})", False
    elif cuda_ok:
        kernels, ok = _cuda_kernels_line()
    elif interpret:
        kernels, ok = "yes, under the Triton interpreter (TRITON_INTERPRET=1; slow, for tests)", True
    else:
        kernels, ok = "no (no CUDA device; TRITON_INTERPRET=1 runs them in the interpreter)", False
    rep.checks.append(Check("fused kernels", kernels, ok=ok))
    if triton_err is not None and _version("triton"):
        rep.missing.append(f"triton does not import ({triton_err}) — the fused kernels fall back to torch")

    try:
        import torch

        from slimtune.ops.dispatch import get_backend, resolve_backend

        from slimtune.ops.autotune import cache_path

        mode = get_backend()
        device = "cuda" if cuda_ok else "cpu"
        if mode == "auto" and cuda_ok:
            path = cache_path()
            n = _cached_verdicts(path)
            picked = (f"measured per op and shape at first use ({n} verdicts cached in {path}; "
                      "`slimtune kernels dispatch` lists them)" if path else "measured per op and shape at first use")
        else:
            picked = resolve_backend(torch.empty(0, device=device), mode)
        rep.checks.append(Check("kernel backend", f"{mode} → {picked} (on {device})"))
    except Exception as e:  # noqa: BLE001 - e.g. SLIMTUNE_KERNELS=triton without a GPU
        rep.checks.append(Check("kernel backend", " ".join(str(e).split()), ok=False))
        rep.missing.append(f"kernel backend: {' '.join(str(e).split())}")

    if _version("bitsandbytes"):
        err = _import_error("bitsandbytes")
        if err is not None:
            rep.checks.append(Check("bitsandbytes import", err, ok=False))
            rep.missing.append(f"bitsandbytes does not import ({err}) — 4-bit bases and 8-bit optimizers fail")

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    rep.checks.append(Check("HF_HUB_OFFLINE", "1 (hub ids load from the local cache only)" if offline else "unset"))
    return rep


def _cuda_kernels_line() -> tuple[str, bool]:
    """The fused kernels on this GPU: Triton needs compute capability 8.0+ (older GPUs run dequant/torch)."""
    import torch

    from slimtune.ops.dispatch import MIN_TRITON_CAPABILITY

    cap = torch.cuda.get_device_capability()
    if cap < MIN_TRITON_CAPABILITY:
        return f"Triton off on sm_{cap[0]}{cap[1]} (needs sm_80+); dequant + cuBLAS and torch run instead", True
    return f"yes (Triton on sm_{cap[0]}{cap[1]}; `auto` measures it against dequant + cuBLAS)", True


def _cached_verdicts(path) -> int:
    import json

    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return 0
    return sum(len(v) for v in data.values() if isinstance(v, dict))
