"""Which GGML type each tensor gets for a requested file type (llama.cpp's quantization mixes, without imatrix).

The `_M` mixes give more bits where the quantization error hurts most (facts from llama.cpp's
`llama_tensor_get_type`): the output projection (or the tied token embedding) takes Q6_K; for Q4_K_M and Q5_K_M,
``attn_v`` and ``ffn_down`` of the first and last eighth of the layers and of every third layer in between take
Q6_K. A K-quant needs rows that are a multiple of 256; otherwise llama.cpp falls back (Q4_K→Q5_0, Q5_K→Q5_1,
Q6_K→Q8_0), and so do we. 1-D tensors (norms, biases) stay F32.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

FILE_TYPES: dict[str, tuple[T, LlamaFileType]] = {
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q6_K": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_KQUANTS = {T.Q4_K, T.Q5_K, T.Q6_K}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layer pick for the extra bits: first/last eighth, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, *, n_layer: int, tied: bool) -> T:
    """The GGML type for tensor ``name`` (llama.cpp naming) of HF ``shape`` (out, in) in file type ``ftype``."""
    base, _ = FILE_TYPES[ftype]
    if len(shape) < 2 or not name.endswith(".weight"):
        return T.F32
    if base in (T.F16, T.BF16):
        return base
    row = shape[-1]
    new = base
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output:
        new = T.Q8_0 if row % 256 else (base if base == T.Q8_0 else T.Q6_K)
        return new
    leaf = name.rsplit(".", 2)[-2] if name.startswith("blk.") else ""
    if ftype in ("Q4_K_M", "Q5_K_M") and leaf in ("attn_v", "ffn_down"):
        if use_more_bits(int(name.split(".")[1]), n_layer):
            new = T.Q6_K
    if new in _KQUANTS and row % 256:
        new = _FALLBACK[new]
    if row % 32:  # no block format fits: keep the tensor in F16 (llama.cpp does the same for odd shapes)
        new = T.F16
    return new
