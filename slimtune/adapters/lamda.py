"""LaMDA and LaMDA++ (Azizi et al. 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation"): y = W x + s · B S A x.

    A (r, in)   frozen: the top-r right singular vectors of W (rows of Vᵀ), or kaiming with ``init: random``
    S (r, r)    trainable, kaiming-uniform: after the freezing phase the only trained matrix (r² per module)
    B (out, r)  zero at init (ΔW = 0 at step 0), trainable, then frozen column by column

Gradual freezing: column j of B (paired with the j-th singular direction) is frozen after optimizer step
t_j = ⌈(j+1)/r · freeze_fraction · total_steps⌉. A frozen column never moves again: a gradient hook zeroes its
gradient, and since AdamW (momentum, decoupled weight decay) would move it anyway, ``on_step`` copies it back
bit-exactly from a snapshot buffer after every optimizer step. The snapshot and the frozen mask are persistent
buffers, so they travel in checkpoints and a resumed run freezes and restores exactly as an uninterrupted one. Once
every column is frozen, B.requires_grad becomes False and ``trainable_names`` drops it: the trainer then removes B
from the optimizer.

LaMDA++ gives every module its own rank from the spectrum of its pretrained weight (see ``LaMDAPlusPlus.plan``).
"""

from __future__ import annotations

import logging
import math
import weakref
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from slimtune.adapters.base import Adapter, AdapterConfig, LowRank, dense_weight, kaiming_uniform_, register
from slimtune.adapters.inject import loading_saved

log = logging.getLogger(__name__)

SVD_SEED = 0  # the randomized SVD's sketch is drawn from this seed: the same base always gives the same A
EXACT_SVD_MAX_DIM = 1024  # exact SVD when min(out, in) is at most this, randomized low-rank SVD above


class LaMDAConfig(AdapterConfig):
    kind: Literal["lamda"] = "lamda"
    init: Literal["svd", "random"] = Field(
        "svd",
        description="A = top-r right singular vectors of the (dequantized) base weight (paper), or kaiming-uniform "
        "(the public code).",
    )
    freeze_fraction: float = Field(
        0.3, gt=0.0, le=1.0,
        description="B's columns are frozen one by one over this fraction of the optimizer steps; then only S trains.",
    )


def is_meta(layer: nn.Module) -> bool:
    return layer.weight.device.type == "meta"


def top_right_singular_vectors(w: torch.Tensor, r: int, *, seed: int = SVD_SEED, niter: int = 4) -> torch.Tensor:
    """The top-r right singular vectors of w (out, in) as rows: (min(r, rank), in), fp32, deterministic.

    Exact SVD for small matrices; above ``EXACT_SVD_MAX_DIM`` a randomized range finder (Halko et al. 2011) with
    ``niter`` power iterations and its own seeded generator (the global RNG is not touched).
    """
    w = w.float()
    m, n = w.shape
    k = min(m, n)
    if k <= EXACT_SVD_MAX_DIM or 4 * r >= k:
        return torch.linalg.svd(w, full_matrices=False).Vh[: min(r, k)]
    q = min(r + 16, k)
    g = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(m, q, generator=g, device=w.device, dtype=w.dtype)  # (out, q) sketch
    basis = torch.linalg.qr(w.t() @ omega).Q  # (in, q): approximate row space of w
    for _ in range(niter):
        basis = torch.linalg.qr(w.t() @ torch.linalg.qr(w @ basis).Q).Q
    _, _, vh_small = torch.linalg.svd(w @ basis, full_matrices=False)  # w ≈ U Σ (vh_small basisᵀ)
    return (vh_small @ basis.t())[:r]  # (r, in)


class _ZeroFrozenColumns:
    """Gradient hook for B: zero the columns marked frozen (reads the mask at call time, so moves are harmless)."""

    def __init__(self, adapter: LaMDA):
        self.adapter = weakref.ref(adapter)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        a = self.adapter()
        if a is None:
            return grad
        return grad.masked_fill(a.lamda_frozen.to(grad.device).view(1, -1), 0)


@register
class LaMDA(Adapter):
    kind = "lamda"
    Config = LaMDAConfig
    description = "LaMDA: frozen spectral A, trainable r×r S, B frozen progressively (then r² per module)"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device = base_layer.weight.device
        r = self.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device), requires_grad=False)  # (r, in)
        self.lamda_S = nn.Parameter(torch.empty(r, r, device=device))  # (r, r)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # (out, r)
        # Freezing state (persistent: saved with the adapter and in checkpoints).
        self.register_buffer("lamda_frozen", torch.zeros(r, dtype=torch.bool, device=device))  # (r,)
        self.register_buffer("lamda_B_frozen", torch.zeros(self.out_features, r, device=device))  # (out, r)
        self.lora_B.register_hook(_ZeroFrozenColumns(self))
        self._schedule: tuple[int, list[int]] = (-1, [])  # (total_steps, freeze step of each column), cached
        self._b_frozen = False  # every column frozen (mirrors lamda_frozen.all() without a device sync)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.config.rank

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_uniform_(self.lamda_S)
            self.lora_B.zero_()
            self.lamda_frozen.zero_()
            self.lamda_B_frozen.zero_()
            self._init_A()

    def _init_A(self) -> None:
        if loading_saved():  # the saved A is this SVD's result: never recompute it on load (minutes on a 7B)
            self.lora_A.zero_()
            return
        if self.config.init == "random" or is_meta(self.base_layer):  # meta: shapes only (parameter counts)
            kaiming_uniform_(self.lora_A)
            return
        w = dense_weight(self.base_layer)  # (out, in) fp32, dequantized for a 4-bit base; freed below
        vh = top_right_singular_vectors(w, self.rank)  # (≤r, in)
        del w
        if vh.shape[0] < self.rank:  # rank larger than min(out, in): the extra directions are random
            kaiming_uniform_(self.lora_A)
        self.lora_A[: vh.shape[0]].copy_(vh)

    def factors(self) -> LowRank:
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, mid=self.lamda_S)

    def trainable_names(self) -> list[str]:
        return ["lamda_S"] if self._b_frozen else ["lora_B", "lamda_S"]

    # --- gradual freezing of B ---------------------------------------------------------------------
    def freeze_step(self, j: int, total_steps: int) -> int:
        """The optimizer step after which column j of B is frozen: ⌈(j+1)/r · freeze_fraction · total_steps⌉."""
        # Spec choice (Azizi et al. 2024, "LaMDA", EMNLP Findings; the paper leaves the exact schedule open): column j
        # freezes at ⌈(j+1)/r · η · T⌉, so all r columns are frozen at ⌈η T⌉. The public code's schedule freezes at
        # most ⌊1/η⌋ columns (a bug) and is deliberately not copied. Exact rational arithmetic on the decimal the user
        # wrote (0.3 = 3/10), so float rounding never shifts a freeze by one step.
        return math.ceil(Fraction(j + 1, self.rank) * Fraction(repr(self.config.freeze_fraction)) * total_steps)

    def on_step(self, step: int, total_steps: int) -> None:
        """Freeze the columns whose time has come, then put every frozen column back to its snapshot.

        No host-device synchronisation: the schedule is nondecreasing in j, so the due columns are a prefix.
        """
        if total_steps <= 0:
            return
        if self._schedule[0] != total_steps:
            self._schedule = (total_steps, [self.freeze_step(j, total_steps) for j in range(self.rank)])
        n_due = sum(t <= step for t in self._schedule[1])
        if n_due and not is_meta(self.base_layer):
            with torch.no_grad():
                due = torch.arange(self.rank, device=self.lamda_frozen.device) < n_due  # (r,)
                new = (due & ~self.lamda_frozen).view(1, -1)  # snapshot these columns now
                snap = self.lamda_B_frozen
                snap.copy_(torch.where(new, self.lora_B.to(snap.dtype), snap))
                self.lamda_frozen |= due
                frozen = self.lamda_frozen.view(1, -1)  # put every frozen column back (undo momentum and decay)
                self.lora_B.copy_(torch.where(frozen, self.lamda_B_frozen.to(self.lora_B.dtype), self.lora_B))
        if n_due == self.rank:
            self._set_b_frozen(True)

    def after_load(self) -> None:
        if not is_meta(self.base_layer):
            self._set_b_frozen(bool(self.lamda_frozen.all()))

    def _set_b_frozen(self, frozen: bool) -> None:
        """All of B frozen: it stops requiring grad, so the trainer drops it from the optimizer."""
        self._b_frozen = frozen
        self.lora_B.requires_grad_(not frozen)
        if frozen:
            self.lora_B.grad = None


# --------------------------------------------------------------------------------------------- LaMDA++


class LaMDAPlusPlusConfig(LaMDAConfig):
    kind: Literal["lamda_pp"] = "lamda_pp"  # type: ignore[assignment]
    energy: float = Field(
        0.9, gt=0.0, le=1.0,
        description="A module's effective rank k = the fewest singular values holding this share of Σσ².",
    )
    r_min: int = Field(8, gt=0, description="Smallest rank a module gets (rounded up to `multiple`).")
    r_max: int = Field(256, gt=0, description="Largest rank a module gets (rounded down to `multiple`).")
    multiple: int = Field(8, gt=0, description="Every module's rank is a multiple of this.")

    @model_validator(mode="after")
    def _check_bounds(self) -> LaMDAPlusPlusConfig:
        if self.r_max < self.r_min:
            raise ValueError(f"r_max ({self.r_max}) must be at least r_min ({self.r_min})")
        if self.r_max // self.multiple < -(-self.r_min // self.multiple):
            raise ValueError(f"no multiple of {self.multiple} lies in [r_min, r_max] = [{self.r_min}, {self.r_max}]")
        return self


def effective_rank(w: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i² / Σσ² ≥ energy (1 for an all-zero matrix)."""
    w = w.float()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w  # (k, k): eigenvalues are σ²
    sig2 = torch.linalg.eigvalsh(gram).double().clamp_min(0).flip(0)  # descending; fp32 is ample for energies
    total = float(sig2.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(sig2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([energy - 1e-6], dtype=cum.dtype)).item()) + 1


def allocate_ranks(
    effective: list[int], budget: int, r_min: int, r_max: int, multiple: int = 8
) -> list[int]:
    """Split ``budget`` over modules proportionally to ``effective``, clamped and in multiples of ``multiple``.

    Works in units of ``multiple``: lo = ⌈r_min/m⌉, hi = ⌊r_max/m⌋, U = budget/m (budget must be a multiple of m and
    n·lo ≤ U ≤ n·hi). First the continuous water-filling solution x_i = clamp(c·k_i, lo, hi) with Σx_i = U (c by
    bisection); then largest-remainder rounding: start from ⌊x_i⌋, hand the missing units one at a time to the module
    with the largest remainder x_i − v_i that is still below hi (and take surplus units, if float error left any,
    from the smallest remainder above lo). The result sums to exactly ``budget``, respects the clamps, and a module
    with a larger effective rank never gets a smaller rank than one with a smaller effective rank (up to ties).
    """
    m = multiple
    n = len(effective)
    if budget % m:
        raise ValueError(f"rank budget {budget} is not a multiple of {m}")
    lo, hi, units = -(-r_min // m), r_max // m, budget // m
    if not n * lo <= units <= n * hi:
        raise ValueError(
            f"rank budget {budget} cannot be split over {n} modules with ranks in [{lo * m}, {hi * m}] "
            f"(needs {n * lo * m}..{n * hi * m}); change rank, r_min or r_max"
        )
    k = [max(float(e), 1e-12) for e in effective]

    def filled(c: float) -> list[float]:
        return [min(max(c * ki, lo), hi) for ki in k]

    c_lo, c_hi = 0.0, hi / min(k)  # filled(c_lo) sums to n·lo ≤ U, filled(c_hi) to n·hi ≥ U
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        c_lo, c_hi = (c, c_hi) if sum(filled(c)) < units else (c_lo, c)
    x = filled(c_hi)
    v = [min(max(math.floor(xi + 1e-9), lo), hi) for xi in x]
    while sum(v) < units:
        i = max((i for i in range(n) if v[i] < hi), key=lambda i: (x[i] - v[i], k[i], -i))
        v[i] += 1
    while sum(v) > units:
        i = min((i for i in range(n) if v[i] > lo), key=lambda i: (x[i] - v[i], k[i], -i))
        v[i] -= 1
    return [vi * m for vi in v]


@register
class LaMDAPlusPlus(LaMDA):
    kind = "lamda_pp"
    Config = LaMDAPlusPlusConfig
    description = "LaMDA++: LaMDA with per-module ranks from each weight's spectrum (budget = rank × modules)"

    @property
    def rank(self) -> int:
        return int(self.module_facts.get("rank", self.config.rank))

    @property
    def scale(self) -> float:
        return self.config.alpha / self.rank  # s = alpha / r with the module's own rank

    @classmethod
    def plan(cls, model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, dict[str, Any]]:
        """Per-module rank: effective rank k of each weight's spectrum, budget R = rank × #modules split ∝ k.

        R is rounded down to a multiple of ``multiple`` when rank × #modules is not one (so the rounded ranks can
        sum to it exactly). On the meta device (parameter counting) the spectrum is unknown and every module gets
        the same k, i.e. the budget split evenly.
        """
        assert isinstance(config, LaMDAPlusPlusConfig)
        layers = [model.get_submodule(n) for n in names]
        if any(is_meta(layer) for layer in layers):
            effective = [1] * len(names)
        else:
            effective = []
            for layer in layers:
                w = dense_weight(layer)  # (out, in) fp32, freed each iteration
                effective.append(effective_rank(w, config.energy))
                del w
        budget = (config.rank * len(names)) // config.multiple * config.multiple
        ranks = allocate_ranks(effective, budget, config.r_min, config.r_max, config.multiple)
        plan = {n: {"rank": r, "effective_rank": k} for n, r, k in zip(names, ranks, effective, strict=True)}
        log.info(
            "LaMDA++ rank allocation (energy %.3g, budget %d over %d modules): %s",
            config.energy, budget, len(names), {n: p["rank"] for n, p in plan.items()},
        )
        return plan
