"""NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination of Random Basis").

LoRA's factors are re-parameterised as linear combinations of fixed random matrices; only the mixture coefficients
train, so the trainable count (k + l per module) is independent of the rank and of the layer's shape:

    A = A₀ + (1/√k) Σ_{i<k} α_i U_i        U_i ∈ [-1, 1)^(r × in)    α ∈ R^k, zero at init
    B =      (1/√l) Σ_{j<l} β_j V_j        V_j ∈ [-1, 1)^(out × r)   β ∈ R^l, zero at init
    y = W x + s · B A x                    s = alpha / r

A₀ is kaiming-uniform (a = √5: uniform in ±1/√in) and frozen, as in the authors' LLaMA code (their LoRA A weight stays
at its init next to the NOLA term; the 1/√k factor on the uniform bases is theirs too). β = 0 gives ΔW = 0 at step 0,
and B's gradient is non-zero there because A = A₀ ≠ 0.

Bases are regenerated, never stored. A module's U_i, V_j and A₀ are a pure function of (module seed, element index):
a counter-based integer hash (``uniform_stream``) that gives the same values on every device and torch version, with
no generator state. ``_Mix`` (an autograd Function) builds Σ c_i U_i in chunks of bases and regenerates the same
chunks in the backward for ∂L/∂c_i = ⟨U_i, ∂L/∂A⟩, so neither the k bases nor their sum's graph are kept. The sums
themselves (r·in and out·r values, LoRA's A and B) are cached until the coefficients change (``_mixed``): one
generation per optimizer step in the forward, one per micro-batch in the backward. Why not cache the bases in
buffers: a module's bases are k·r·in + l·out·r values — at k = l = 1024, r = 8 on a 4096 × 4096 layer that is 268 MB
per module (fp32), ~1000× the LoRA they replace (at the default 128, ~130×); regenerating costs one integer hash per
value, which a GPU does at memory speed. The factors are then ordinary tensors that the fused QLoRA ops take like
LoRA's (``factors``): NOLA trains on the same fused 4-bit path.

Export: A and B are materialised, so the PEFT export is a plain rank-r LoRA; the native format stores α, β and the
per-module seeds (saved in the adapter config), from which the bases are regenerated on load.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import Adapter, AdapterConfig, LowRank, register

M32 = 0xFFFFFFFF
HASH_MUL = 0x45D9F3B  # < 2^27: every product of a 32-bit value with it fits in int64
CHUNK_VALUES = 1 << 22  # bases generated at a time: at most this many values (plus int64 temporaries)
STREAM_A, STREAM_B, STREAM_A0 = 1, 2, 3


def _hash32_int(x: int) -> int:
    x &= M32
    x = (((x >> 16) ^ x) * HASH_MUL) & M32
    x = (((x >> 16) ^ x) * HASH_MUL) & M32
    return (x >> 16) ^ x


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The same integer hash on an int64 tensor of values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * HASH_MUL & M32
    x = ((x >> 16) ^ x) * HASH_MUL & M32
    return (x >> 16) ^ x


def uniform_stream(seed: int, stream: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` values in [-1, 1) (fp32, 24-bit resolution): value i is a pure function of (seed, stream, start + i).

    Identical on every device (integer arithmetic only), and any slice can be regenerated alone.
    """
    s1 = _hash32_int(seed ^ _hash32_int(stream * 0x9E3779B1))
    s2 = _hash32_int(s1 + 0x632BE5AB)
    idx = torch.arange(start, start + count, device=device, dtype=torch.int64)  # (count,)
    x = _hash32((idx & M32) ^ s1)
    x = _hash32(x ^ (((idx >> 32) + s2) & M32))
    return (x >> 8).to(torch.float32) * (2.0**-23) - 1.0  # (count,)


def basis_chunk(seed: int, stream: int, first: int, n: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """Bases first .. first+n-1 of a stream, each flattened: (n, numel) fp32."""
    return uniform_stream(seed, stream, first * numel, n * numel, device).view(n, numel)


class _Mix(torch.autograd.Function):
    """scale · Σ_i c_i U_i (U_i = basis i of ``stream``), shape (rows, cols); the bases are regenerated in the
    backward instead of being saved: ∂L/∂c_i = scale · ⟨U_i, ∂L/∂out⟩."""

    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, seed: int, stream: int, rows: int, cols: int, scale: float,
                value: torch.Tensor | None):
        ctx.meta = (coeffs.shape[0], seed, stream, rows * cols, scale, coeffs.dtype)
        if value is not None:  # the sum for these very coefficients, computed before (``NOLA._mixed``)
            return value.clone()
        return mixed_value(coeffs, seed, stream, rows, cols, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k, seed, stream, numel, scale, dtype = ctx.meta
        per = max(1, CHUNK_VALUES // max(numel, 1))
        g = grad.reshape(-1).float()  # (rows·cols,)
        out = torch.empty(k, device=grad.device, dtype=torch.float32)
        for i in range(0, k, per):
            n = min(per, k - i)
            out[i : i + n] = basis_chunk(seed, stream, i, n, numel, grad.device) @ g  # (n,)
        return (out * scale).to(dtype), None, None, None, None, None, None


def mixed_value(coeffs: torch.Tensor, seed: int, stream: int, rows: int, cols: int, scale: float) -> torch.Tensor:
    """scale · Σ_i coeffs[i] · U_i (rows, cols) in the coefficients' dtype, no graph; bases generated chunk by chunk."""
    k, numel = coeffs.shape[0], rows * cols
    per = max(1, CHUNK_VALUES // max(numel, 1))
    out = torch.zeros(numel, device=coeffs.device, dtype=torch.float32)  # (rows·cols,)
    c = coeffs.detach().float()
    for i in range(0, k, per):
        n = min(per, k - i)
        out += c[i : i + n] @ basis_chunk(seed, stream, i, n, numel, coeffs.device)  # (n,) @ (n, numel)
    return (out * scale).view(rows, cols).to(coeffs.dtype)


def mix(coeffs: torch.Tensor, seed: int, stream: int, rows: int, cols: int, scale: float,
        value: torch.Tensor | None = None) -> torch.Tensor:
    """scale · Σ_i coeffs[i] · U_i as a (rows, cols) tensor, differentiable in ``coeffs`` (``value``: that sum,
    already computed for these coefficients)."""
    return _Mix.apply(coeffs, seed, stream, rows, cols, scale, value)


def module_seed(seed: int, name: str) -> int:
    """A module's basis seed: the recipe's seed and the module's name (stable across runs and machines)."""
    return _hash32_int(seed * 0x27D4EB2F + zlib.crc32(name.encode()))


class NOLAConfig(AdapterConfig):
    kind: Literal["nola"] = "nola"
    num_basis_a: int = Field(128, gt=0, description="k: random bases whose combination (+ A₀) is A (the public "
                             "LLaMA code's default).")
    num_basis_b: int = Field(128, gt=0, description="l: random bases whose combination is B.")
    seed: int = Field(0, ge=0, description="Basis seed; each module's own seed mixes in its name.")


@register
class NOLA(Adapter):
    kind = "nola"
    Config = NOLAConfig
    description = "NOLA: A, B = combinations of seeded random bases; only k + l coefficients per module train"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device = base_layer.weight.device
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_a, device=device))  # (k,)
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_b, device=device))  # (l,)
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (key, A₀, ΣαU, ΣβV)
        self.reset_parameters()

    @classmethod
    def plan(cls, model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, dict[str, Any]]:
        return {n: {"seed": module_seed(config.seed, n)} for n in names}

    @property
    def seed(self) -> int:
        return int(self.module_facts.get("seed", module_seed(self.config.seed, self.name)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.nola_alpha.zero_()
            self.nola_beta.zero_()

    def initial_a(self) -> torch.Tensor:
        """A₀ (r, in) fp32: kaiming-uniform(a=√5), i.e. uniform in ±1/√in, regenerated from the seed."""
        r, n_in = self.config.rank, self.in_features
        u = uniform_stream(self.seed, STREAM_A0, 0, r * n_in, self.nola_alpha.device)
        return (u / math.sqrt(n_in)).view(r, n_in)

    def _mixed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A₀, (1/√k) Σ α_i U_i, (1/√l) Σ β_j V_j) as values, recomputed only when α or β changed (their version
        counters: once per optimizer step, not once per micro-batch or per evaluation forward)."""
        al, be = self.nola_alpha, self.nola_beta
        key = (al._version, be._version, al.data_ptr(), be.data_ptr(), al.dtype, al.device)
        if self._cache is None or self._cache[0] != key:
            r, k, l = self.config.rank, self.config.num_basis_a, self.config.num_basis_b
            a0 = self.initial_a().to(al.dtype)  # (r, in)
            a_mix = mixed_value(al, self.seed, STREAM_A, r, self.in_features, 1.0 / math.sqrt(k))  # (r, in)
            b_mix = mixed_value(be, self.seed, STREAM_B, self.out_features, r, 1.0 / math.sqrt(l))  # (out, r)
            self._cache = (key, a0, a_mix, b_mix)
        return self._cache[1:]

    def after_load(self) -> None:
        self._cache = None

    def factors(self) -> LowRank:
        r, k, l = self.config.rank, self.config.num_basis_a, self.config.num_basis_b
        a0, a_mix, b_mix = self._mixed()
        a = a0 + mix(self.nola_alpha, self.seed, STREAM_A, r, self.in_features, 1.0 / math.sqrt(k), a_mix)  # (r, in)
        b = mix(self.nola_beta, self.seed, STREAM_B, self.out_features, r, 1.0 / math.sqrt(l), b_mix)  # (out, r)
        return LowRank(A=a, B=b, scale=self.scale)
