"""Test configuration: CPU-only by default; Triton kernels run under the interpreter when no GPU exists."""

import os

# Must be set before triton is imported anywhere (the interpreter is chosen at import/JIT time).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# One intra-op thread per test process: `make test` runs 2 xdist workers on CI's 2 cores, and 2 threads per worker
# oversubscribe them (a colleague measured ~5x slower adapter tests at 2 threads x 2 workers).
if not _HAS_CUDA:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
