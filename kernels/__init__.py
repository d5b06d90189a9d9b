"""slimtune.kernels: the Triton kernels and their launchers (installed from the top-level kernels/ folder).

Imports only torch, triton and other slimtune.kernels modules; slimtune/ops/ reaches these modules through
`slimtune.ops.dispatch.triton_module(name)`, so the torch and dequant backends run without triton installed.
Each module lists the kernel variants a run launches in `COMPILE_VARIANTS` (or, for the GEMMs, they are captured
from the real launchers: slimtune/ops/compile_matrix.py) for the ahead-of-time compile matrix.
"""
