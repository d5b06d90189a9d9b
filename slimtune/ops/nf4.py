"""The bitsandbytes 4-bit format (NF4 / FP4), read in place, plus the plain-torch reference dequantization.

Layout (bitsandbytes >= 0.45, `Params4bit` with `quant_storage=uint8`):

    W (out, in) flattened row-major -> n = out*in values, flat index f = o*in + i
    packed[f // 2]            uint8, high nibble = even f, low nibble = odd f
    code[nibble]              16-entry fp32 table (`quant_state.code`: NF4 or FP4 values in [-1, 1])
    absmax[f // blocksize]    one fp32 scale per block of `blocksize` (64) values
    W[f] = code[nibble] * absmax[f // blocksize]          (fp32 product, then cast to the compute dtype)

With double quant (`quant_state.nested`, `compress_statistics=True`) the absmax are themselves 8-bit codes:

    absmax[b] = state2.code[absmax_u8[b]] * state2.absmax[b // state2.blocksize] + offset      (blocksize2 = 256)

Both formulas reproduce `bitsandbytes.functional.dequantize_4bit` bit for bit (tests/kernels/test_nf4.py).
`NF4Weight` only holds references to the tensors of a `Params4bit` and its `quant_state`; nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Any

import torch

from slimtune.errors import ModelError

__all__ = ["NF4Weight", "dequantize_nf4", "quantize_4bit", "as_nf4_weight", "dense_weight"]


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A frozen 4-bit weight W (out, in) as bitsandbytes stores it (views of the original tensors)."""

    packed: torch.Tensor  # (out*in/2,) uint8: two 4-bit codes per byte, high nibble first
    code: torch.Tensor  # (16,) fp32: value of each 4-bit code
    absmax: torch.Tensor  # (n_blocks,) fp32 scales, or uint8 codes when nested (double quant)
    blocksize: int  # values per absmax (64)
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # dtype W had before quantization (bitsandbytes dequantizes to it)
    quant_type: str = "nf4"  # "nf4" | "fp4" (informational: the code table says everything)
    absmax_code: torch.Tensor | None = None  # (256,) fp32: state2.code (nested only)
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks/256),) fp32: state2.absmax (nested only)
    absmax_blocksize: int = 256  # state2.blocksize
    absmax_offset: torch.Tensor | None = None  # (1,) fp32: quant_state.offset (nested only)
    quant_state: Any = field(default=None, compare=False, repr=False)  # the bnb QuantState it wraps (fast path)

    @property
    def nested(self) -> bool:
        return self.absmax_code is not None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """Wrap packed data (any shape; (out*in/2, 1) for `Params4bit`) and its bitsandbytes `QuantState`."""
        qs = quant_state
        if qs is None:
            raise ModelError("4-bit weight has no quant_state (was the Linear4bit moved to its device yet?)")
        shape = tuple(int(s) for s in qs.shape)
        if len(shape) != 2:
            raise ModelError(f"4-bit weight: expected a 2-D (out, in) quant_state.shape, got {shape}")
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:  # quant_storage=bf16/fp32 etc.: same bytes
            flat = flat.view(torch.uint8)
        n = shape[0] * shape[1]
        if flat.numel() != (n + 1) // 2:
            raise ModelError(f"4-bit weight: {flat.numel()} packed bytes do not hold a {shape[0]}x{shape[1]} weight")
        nested = bool(getattr(qs, "nested", False))
        kw = {}
        if nested:
            s2 = qs.state2
            kw = dict(
                absmax_code=s2.code.reshape(-1),
                absmax_scale=s2.absmax.reshape(-1),
                absmax_blocksize=int(s2.blocksize),
                absmax_offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=flat.device).reshape(1),
            )
        return cls(
            packed=flat,
            code=qs.code.reshape(-1),
            absmax=qs.absmax.reshape(-1),
            blocksize=int(qs.blocksize),
            shape=(shape[0], shape[1]),
            dtype=qs.dtype,
            quant_state=qs,
            quant_type=str(getattr(qs, "quant_type", "nf4")),
            **kw,
        )

    @classmethod
    def from_params4bit(cls, weight) -> NF4Weight:
        """From a bitsandbytes `Params4bit` (the `.weight` of a quantized `Linear4bit`)."""
        return cls.from_quant_state(weight.data, getattr(weight, "quant_state", None))

    def row_unit(self) -> int:
        """Smallest row count r with r·in a whole number of (second-level, when nested) absmax blocks."""
        import math

        q = self.blocksize * (self.absmax_blocksize if self.nested else 1)
        return q // math.gcd(self.in_features, q)

    def rows(self, start: int, stop: int) -> NF4Weight:
        """Rows [start, stop) as an NF4Weight of views, nothing copied (the streamed lm_head of ops/linear_ce.py).

        `start` must be a multiple of `row_unit()` so the slice owns whole absmax blocks; `stop` any row. The
        bitsandbytes quant_state is sliced alike (a shallow copy), so `dense_weight` keeps its native fast path.
        """
        import copy

        o, i = self.shape
        if not 0 <= start <= stop <= o or start % self.row_unit():
            unit = self.row_unit()
            raise ModelError(f"NF4Weight.rows({start}, {stop}): rows of {o}, starting at a multiple of {unit}")
        f0, f1 = start * i, stop * i
        b0, b1 = f0 // self.blocksize, -(-f1 // self.blocksize)
        c0, c1 = b0 // self.absmax_blocksize, -(-b1 // self.absmax_blocksize)
        absmax_scale = self.absmax_scale[c0:c1] if self.nested else None
        qs = None
        if self.quant_state is not None:
            qs = copy.copy(self.quant_state)
            qs.absmax, qs.shape = self.absmax[b0:b1], torch.Size((stop - start, i))
            if self.nested:
                qs.state2 = copy.copy(self.quant_state.state2)
                qs.state2.absmax = absmax_scale
        return NF4Weight(
            packed=self.packed[f0 // 2 : (f1 + 1) // 2], code=self.code, absmax=self.absmax[b0:b1],
            blocksize=self.blocksize, shape=(stop - start, i), dtype=self.dtype, quant_type=self.quant_type,
            absmax_code=self.absmax_code, absmax_scale=absmax_scale, absmax_blocksize=self.absmax_blocksize,
            absmax_offset=self.absmax_offset, quant_state=qs,
        )

    def block_absmax(self) -> torch.Tensor:
        """First-level absmax as fp32 (n_blocks,); a small new tensor when nested, the stored one otherwise."""
        if not self.nested:
            return self.absmax.float()
        n_blocks = self.absmax.numel()
        scale = self.absmax_scale.repeat_interleave(self.absmax_blocksize)[:n_blocks]
        return self.absmax_code[self.absmax.long()] * scale + self.absmax_offset  # same op order as bnb

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole W (out, in) in `dtype` (default: the dtype it was quantized from). Reference/tests only."""
        n = self.shape[0] * self.shape[1]
        nib = torch.stack((self.packed >> 4, self.packed & 0xF), dim=1).reshape(-1)[:n].long()
        vals = self.code[nib]  # fp32 (n,)
        absmax = self.block_absmax()
        full = (n // self.blocksize) * self.blocksize
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        out[:full] = (vals[:full].view(-1, self.blocksize) * absmax[: full // self.blocksize, None]).reshape(-1)
        if full < n:
            out[full:] = vals[full:] * absmax[-1]
        return out.view(self.shape).to(dtype or self.dtype)


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch reference: the (out, in) weight bitsandbytes would return from `dequantize_4bit`."""
    return NF4Weight.from_quant_state(packed, quant_state).dequantize(dtype)


def quantize_4bit(
    weight: torch.Tensor, *, double_quant: bool = True, quant_type: str = "nf4", blocksize: int = 64
) -> NF4Weight:
    """Quantize a dense (out, in) weight with bitsandbytes (any device it supports) and wrap the result."""
    import bitsandbytes.functional as bnbf

    packed, qs = bnbf.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    return NF4Weight.from_quant_state(packed, qs)


def as_nf4_weight(weight) -> NF4Weight | torch.Tensor:
    """A frozen base weight for the fused ops: `NF4Weight` for a `Params4bit`, the tensor itself otherwise.

    Accepts an `NF4Weight`, a dense tensor/Parameter, a `Params4bit`, or a module with `.weight` (nn.Linear,
    bnb Linear4bit).
    """
    if isinstance(weight, NF4Weight):
        return weight
    if isinstance(weight, torch.nn.Module):
        weight = weight.weight
    if getattr(weight, "quant_state", None) is not None:  # a quantized bnb Params4bit
        return NF4Weight.from_params4bit(weight)
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ModelError(f"base weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        return weight.detach()
    raise ModelError(f"unsupported base weight type {type(weight).__name__}")


def dense_weight(base: NF4Weight | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) as a dense `dtype` tensor: dequantized for NF4 (a transient copy; reference path only).

    When every row holds whole absmax blocks (in_features % blocksize == 0, true of every real model) this calls
    bitsandbytes' native dequantize, which is bit-identical there (tests/kernels/test_nf4.py checks it) and 23x
    faster on CPU (0.11 vs 2.6 ms for 1536x576, measured on this 2-core machine). Rows that straddle blocks take
    the readable torch path: bnb's native CPU op is wrong there (see test_nf4.py).
    """
    if isinstance(base, NF4Weight):
        if base.quant_state is not None and base.in_features % base.blocksize == 0:
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(base.packed.view(-1, 1), base.quant_state).to(dtype)
        return base.dequantize(dtype)
    return base.to(dtype)
