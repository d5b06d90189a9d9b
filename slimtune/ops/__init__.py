"""The fused ops: one public function each; Triton, dequant + cuBLAS or the torch reference chosen per call
(see dispatch.py; `train.kernels: auto` measures the candidates at first use, `dispatch_report()` says what won).

    from slimtune.ops import rms_norm, rope, linear_cross_entropy, set_backend
    from slimtune.ops.lora_linear import lora_linear, lora_projection, LoRAProjection
    from slimtune.ops.lora_mlp import lora_mlp
    from slimtune.ops.lora_qkv import lora_qkv

The GEMM ops are not re-exported here: their functions share their modules' names, and binding the function on
the package would shadow the module for code that does ``from slimtune.ops import lora_linear`` to get the module.
``rms_norm`` and ``rope`` shadow their modules too: import their helpers from the
module path (``from slimtune.ops.rms_norm import rms_norm_forward_ref``), which always resolves to the module.
"""

from slimtune.ops.dispatch import dispatch_report, resolve_backend, set_backend, use_backend
from slimtune.ops.linear_ce import linear_cross_entropy
from slimtune.ops.rms_norm import rms_norm
from slimtune.ops.rope import rope

__all__ = ["dispatch_report", "linear_cross_entropy", "resolve_backend", "rms_norm", "rope", "set_backend", "use_backend"]
