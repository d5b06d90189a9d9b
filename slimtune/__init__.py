"""slimtune: memory-efficient single-GPU fine-tuning of LLMs on 4-bit bases."""

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds `slimtune.kernels` in a checkout's top-level kernels/ folder, when it is first imported.

    The folder has no __init__.py on purpose: with the repository root on sys.path (`python -m slimtune` in a
    checkout, torchrun, subprocesses started there), a regular package named `kernels` would shadow the PyPI package
    of that name that transformers imports while loading any model; a folder without __init__.py never wins over a
    regular package. A wheel installs the folder at slimtune/kernels, where the ordinary import system finds it; an
    editable install's finder maps only folders that have an __init__.py, so on a checkout this finder does. Nothing
    is imported until something asks for slimtune.kernels (the torch backends run without triton).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != "slimtune.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(self.folder)]
        return spec


_folder = Path(__file__).resolve().parent.parent / "kernels"
if not (Path(__file__).parent / "kernels").is_dir() and (_folder / "rms_norm.py").is_file():
    sys.meta_path.append(_CheckoutKernels(_folder))
