"""slimtune: memory-efficient single-GPU fine-tuning of LLMs on 4-bit bases."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _checkout_kernels() -> None:
    """Register a checkout's top-level kernels/ folder as `slimtune.kernels`.

    The folder has no __init__.py on purpose: with the repository root on sys.path (`python -m slimtune` in a
    checkout, torchrun, subprocesses started there), a regular package named `kernels` would shadow the PyPI package
    of that name that transformers imports while loading any model; a folder without __init__.py never wins over a
    regular package. A wheel installs the folder at slimtune/kernels, where the ordinary import system finds it; an
    editable install's finder maps only folders that have an __init__.py, so on a checkout it is registered here.
    """
    if "slimtune.kernels" in sys.modules or (Path(__file__).parent / "kernels").is_dir():
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "rms_norm.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec("slimtune.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["slimtune.kernels"] = module
    globals()["kernels"] = module


_checkout_kernels()
