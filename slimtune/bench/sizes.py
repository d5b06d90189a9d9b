"""Byte sizes the memory estimator composes: dtypes, bitsandbytes 4-bit weights, optimizer state (no model logic)."""

from __future__ import annotations

import math
from typing import Any

from slimtune.errors import SlimtuneError

GiB = 1024**3
GB = 1000**3

#: bitsandbytes: 8-bit optimizer state only for tensors with at least this many values.
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes 8-bit optimizer block size (one fp32 absmax per block and moment).
BNB_OPTIM_BLOCK = 256
#: bitsandbytes 4-bit block size and double-quant second-level block size.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "fp16": 2, "half": 2,
}
_DTYPE_NAME = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_bytes(value: Any) -> tuple[str, int]:
    """Normalise a dtype given as torch.dtype or string to (name, bytes)."""
    name = str(value).removeprefix("torch.").lower()
    name = _DTYPE_NAME.get(name, name)
    if name not in _DTYPE_BYTES:
        raise SlimtuneError(f"dtype {value!r}: expected one of float32, bfloat16, float16")
    return name, _DTYPE_BYTES[name]


def quantized_weight_bytes(numel: int, *, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit (nf4/fp4) weight of `numel` values, quant state included."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the 16-entry NF4/FP4 code table (fp32), one per QuantState
    if not double_quant:
        return packed + 4 * blocks + code
    second = math.ceil(blocks / NF4_DQ_BLOCK)
    # uint8 absmax codes + fp32 second-level absmax + fp32 offset + 256-entry fp32 code of the nested state
    return packed + blocks + 4 * second + 4 + code + 256 * 4


def optimizer_state_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> int:
    """Optimizer state for trainable tensors of the given sizes."""
    total = 0
    for n in sizes:
        if optimizer == "adamw":
            total += 2 * n * param_bytes  # exp_avg, exp_avg_sq in the parameter dtype
        elif n < BNB_MIN_8BIT_SIZE:
            total += 2 * n * 4  # bitsandbytes falls back to 32-bit state
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
    return total
