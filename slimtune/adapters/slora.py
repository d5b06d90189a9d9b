"""Three-matrix adapters with a trainable middle: SLoRA, NLoRA and IntTune (Guo et al. 2025).

    y = W x + s · B N A x        A (r, in), N (r, r), B (out, r), s = alpha / r

- **SLoRA**: A kaiming, N kaiming, B = 0 (ΔW = 0 at step 0); A, N and B all train.
- **NLoRA**: Nyström initialisation from the base weight W (dequantized when 4-bit): C = W[:, :r] (out, r),
  R = W[:r, :] (r, in), U = W[:r, :r]; B = C, A = R, N = pinv(U), so B N A is the Nyström approximation of W.
  Because B N A ≠ 0, the initial value s·B₀N₀A₀ is taken out again so that training starts from the original model
  (``residual``):
    * ``base``: the base becomes W_res = W − s·B₀N₀A₀, exact up to fp32 rounding. Refused on 4-bit and 16-bit
      bases: they would be re-rounded, and the Nyström residual of a real weight is often many times larger than W
      (3–25× in Frobenius norm on SmolLM2-135M at r 8–32). Merge is the plain W_res + s·B N A =
      W + s·(B N A − B₀N₀A₀); ``restore_base`` (unload) adds s·B₀N₀A₀ back.
    * ``adapter`` (the default): the base is untouched and the adapter adds s·(B N A − B₀N₀A₀) itself, written as
      (B − B₀) N A + B₀ (N − N₀) A + B₀N₀ (A − A₀) (rank 3r; every term is exactly zero at init, so the start is
      bit-exact on any base and low-precision compute never cancels large terms).
  ``init: as_released`` reproduces the public code instead: N = U and nothing taken out (the model does not start
  at the original).
  ``balance`` (default on, ``init: nystrom``): C, pinv(U), R are scaled by three scalars so that an Adam step on each
  factor moves W as much as a LoRA step on A does (``balance_factors``). Unscaled, the factor norms multiply every
  step: on SmolLM2-135M r8, ‖C U⁺‖ is 95-740 and ‖U⁺ R‖ 86-455 against LoRA's ‖A₀‖ = 1.6, and the loss went
  2.9 → 12-21 after one step at lr 1e-3 and 1e-4 (only 1e-5 trained). Scaling keeps the factors' subspaces and,
  since the init is taken out again, the start; it also shrinks the residual a 4-bit base is re-quantized with.
- **IntTune**: the NLoRA initialisation, then A and B frozen: only N trains (r² per module). With
  ``residual: adapter`` its update is simply s·B (N − N₀) A (rank r).

Export. The PEFT export is relative to the *original* base: NLoRA keeps B₀, N₀, A₀ as buffers and exports the rank-2r
LoRA s·(B N A − B₀N₀A₀) = [s·(B N − B₀N₀), s·B₀N₀]·[A; A − A₀], each product small (no cancellation in PEFT's fp32).
IntTune's A and B never move, so it keeps only N₀ and exports the exact rank-r LoRA s·B (N − N₀)·A.
Loading a saved adapter never recomputes the Nyström init (`loading_saved`): the saved factors are its result.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import (
    Adapter,
    AdapterConfig,
    LowRank,
    PeftFactors,
    dense_weight,
    is_4bit,
    kaiming_uniform_,
    register,
    set_dense_weight,
)
from slimtune.adapters.inject import loading_saved

log = logging.getLogger(__name__)


def _is_meta(layer: nn.Module) -> bool:
    return layer.weight.device.type == "meta"


# --------------------------------------------------------------------------------------------- SLoRA


class SLoRAConfig(AdapterConfig):
    kind: Literal["slora"] = "slora"


@register
class SLoRA(Adapter):
    kind = "slora"
    Config = SLoRAConfig
    description = "SLoRA: B N A with a trainable r×r middle N; A, N kaiming, B = 0"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        device = base_layer.weight.device
        r = config.rank
        # zeros, not empty: a subclass's first residual_delta() multiplies them before they are initialised
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))  # (r, in)
        self.lora_N = nn.Parameter(torch.zeros(r, r, device=device))  # (r, r)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r)
        self._register_state()
        self.reset_parameters()

    def _register_state(self) -> None:
        """Extra buffers a subclass keeps (registered before the first ``reset_parameters``)."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_uniform_(self.lora_A)
            kaiming_uniform_(self.lora_N)
            self.lora_B.zero_()

    def factors(self) -> LowRank:
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, mid=self.lora_N)


# --------------------------------------------------------------------------------------------- NLoRA


class NLoRAConfig(AdapterConfig):
    kind: Literal["nlora"] = "nlora"
    init: Literal["nystrom", "as_released"] = Field(
        "nystrom",
        description="nystrom: B = W[:, :r], N = pinv(W[:r, :r]), A = W[:r, :], and the initial s·B N A is taken out "
        "again (see `residual`) so the model starts at the original; as_released: N = W[:r, :r] and nothing taken "
        "out, as in the public code.",
    )
    residual: Literal["base", "adapter"] = Field(
        "adapter",
        description="Where the initial s·B₀N₀A₀ is taken out (init: nystrom). adapter (default): the base stays "
        "untouched and the adapter computes s·(B N A − B₀N₀A₀) itself, as a sum of terms that are each zero at init "
        "(exact start on any base). base: the base weight becomes W − s·B₀N₀A₀; only on an fp32 base (refused on "
        "4-bit and bf16/fp16 bases: re-rounding a residual 3–25x larger than W gave PEFT/merged logits off by "
        "1.3–1.6 relative max on SmolLM2 NF4).",
    )
    balance: bool = Field(
        True,
        description="init: nystrom. Rescale C, pinv(U), R by three scalars so an Adam step on each factor moves W "
        "about as much as a LoRA step at the same lr (the Nyström factors' norms amplify it 30-300x on SmolLM2: "
        "unbalanced, only lr <= 1e-5 trains). Subspaces and the start (init taken out) are unchanged.",
    )


def nystrom_factors(w: torch.Tensor, r: int, *, pinv: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, N, R) of w (out, in): C = w[:, :r] (out, r), N = pinv(U) or U (U = w[:r, :r]), R = w[:r, :] (r, in)."""
    out_f, in_f = w.shape
    if r > min(out_f, in_f):
        raise ValueError(f"Nyström init needs rank ≤ min(out, in) = {min(out_f, in_f)}, got rank {r}")
    u = w[:r, :r]
    n = torch.linalg.pinv(u.double()).to(w.dtype) if pinv else u.clone()
    return w[:, :r].clone(), n, w[:r, :].clone()


def balance_factors(
    c: torch.Tensor, n: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_c·C, g_n·N, g_r·R) with scalars chosen so that each factor's tangent gain equals LoRA's at init.

    With Adam every element of a factor moves by about lr per step whatever its gradient's scale, so a step on B
    moves B N A by ‖N A‖·lr-ish, a step on A by ‖B N‖, a step on N by ‖B‖‖A‖. LoRA's gain is ‖A₀‖ = sqrt(r/3)
    (kaiming-uniform, B₀ = 0). Solving g_n g_r ‖N R‖ = g_c g_n ‖C N‖ = g_c g_r ‖C‖‖R‖ = sqrt(r/3) (linear in
    log g) gives the three scalars. Measured on SmolLM2-135M r8: raw gains 95-740 (‖C U⁺‖), 86-455 (‖U⁺ R‖),
    ~400 (‖C‖‖R‖), i.e. 50-450x LoRA's 1.63: the loss went 2.9 → 12-21 after one step at lr 1e-4.
    """
    k = torch.tensor(c.shape[1] / 3.0, dtype=torch.float64).sqrt().log()  # log LoRA gain
    cd, nd, rd = c.double(), n.double(), r.double()
    la = k - (nd @ rd).norm().log()  # log(g_n g_r)
    lb = k - (cd @ nd).norm().log()  # log(g_c g_n)
    lc = k - (cd.norm() * rd.norm()).log()  # log(g_c g_r)
    total = (la + lb + lc) / 2  # log(g_c g_n g_r)
    g_c, g_n, g_r = (total - la).exp(), (total - lc).exp(), (total - lb).exp()
    return (cd * g_c).to(c.dtype), (nd * g_n).to(n.dtype), (rd * g_r).to(r.dtype)


@register
class NLoRA(SLoRA):
    kind = "nlora"
    Config = NLoRAConfig
    description = "NLoRA: SLoRA with a Nyström init from W, taken out again so training starts at the original"

    @property
    def nystrom(self) -> bool:
        """The init is the Nyström one and is taken out again (the model starts at the original)."""
        return self.config.init == "nystrom"

    @property
    def residual_in_base(self) -> bool:
        return self.nystrom and self.config.residual == "base"

    def _register_state(self) -> None:
        if self.nystrom:  # the initial factors; zero until the first init
            r, device = self.config.rank, self.lora_A.device
            self.register_buffer("nlora_B0", torch.zeros(self.out_features, r, device=device))  # (out, r)
            self.register_buffer("nlora_N0", torch.zeros(r, r, device=device))  # (r, r)
            self.register_buffer("nlora_A0", torch.zeros(r, self.in_features, device=device))  # (r, in)

    @classmethod
    def plan(cls, model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, dict[str, Any]]:
        if config.init != "nystrom" or config.residual != "base":
            return {}
        layers = [model.get_submodule(n) for n in names]
        lossy = [n for n, m in zip(names, layers) if is_4bit(m) or (not _is_meta(m) and m.weight.dtype != torch.float32)]
        if lossy:
            raise ValueError(
                f"adapter.residual: base needs an fp32 base ({len(lossy)}/{len(names)} target layers are 4-bit or "
                "16-bit: W − s·B₀N₀A₀ would be re-rounded, and the Nyström term is 3-25x W); use residual: adapter"
            )
        log.info("%s: the base of %d target layers is made residual (W − s·B N A)", cls.kind, len(names))
        return {}  # nothing per module: the shapes follow from the config

    # --- the initial value and where it was taken out (IntTune stores it differently) ----------------
    def initial_bn(self) -> torch.Tensor:
        """B₀N₀ (out, r) fp32."""
        return self.nlora_B0.float() @ self.nlora_N0.float()

    def initial_a(self) -> torch.Tensor:
        """A₀ (r, in) fp32."""
        return self.nlora_A0.float()

    def _remember_init(self) -> None:
        self.nlora_B0.copy_(self.lora_B.detach())
        self.nlora_N0.copy_(self.lora_N.detach())
        self.nlora_A0.copy_(self.lora_A.detach())

    def _forget_init(self) -> None:
        for t in (self.nlora_B0, self.nlora_N0, self.nlora_A0):
            t.zero_()

    def removed_from_base(self) -> torch.Tensor:
        """s·B₀N₀A₀ (out, in) fp32 when the base was made residual, else zero."""
        if not self.residual_in_base:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        return self.scale * (self.initial_bn() @ self.initial_a())

    def reset_parameters(self) -> None:
        """Nyström init from the original weight (the base plus what an earlier init took out of it).

        Skipped while a saved adapter is being loaded (`loading_saved`): the saved B₀, N₀, A₀ are this init's
        result; `after_load` then takes s·B₀N₀A₀ out of the base with them (``residual: base``).
        """
        if _is_meta(self.base_layer):  # shapes only (parameter counts)
            super().reset_parameters()
            return
        if loading_saved():
            self._residual_pending = self.residual_in_base
            return
        with torch.no_grad():
            w = dense_weight(self.base_layer) + self.removed_from_base()  # (out, in) fp32 original; a fresh tensor
            c, n, r = nystrom_factors(w, self.config.rank, pinv=self.nystrom)
            if self.nystrom and self.config.balance:  # the init is taken out again: its scale is free
                c, n, r = balance_factors(c, n, r)
            self.lora_B.copy_(c)
            self.lora_N.copy_(n)
            self.lora_A.copy_(r)
            if self.nystrom:
                self._remember_init()
            if self.residual_in_base:
                bna = (c.double() @ n.double() @ r.double()) * self.scale  # (out, in) in fp64: cancellation-safe
                set_dense_weight(self.base_layer, (w.double() - bna).float())
            del w

    def factors(self) -> LowRank:
        if not self.nystrom or self.residual_in_base:
            return super().factors()
        # residual: adapter. B N A − B₀N₀A₀ = (B − B₀) N A + B₀ (N − N₀) A + B₀N₀ (A − A₀): rank 3r, every term is
        # zero at init and small while training, so there is no cancellation of large terms in low precision.
        A, N, B = self.lora_A, self.lora_N, self.lora_B
        B0, N0, A0 = self.nlora_B0.to(B.dtype), self.nlora_N0.to(N.dtype), self.nlora_A0.to(A.dtype)
        eye = torch.eye(N.shape[0], dtype=N.dtype, device=N.device)
        return LowRank(
            A=torch.cat([A, A, A - A0], dim=0),  # (3r, in)
            B=torch.cat([B - B0, B0, B0 @ N0], dim=1),  # (out, 3r)
            mid=torch.block_diag(N, N - N0, eye),  # (3r, 3r)
            scale=self.scale,
        )

    def after_load(self) -> None:
        """A loaded ``residual: base`` adapter: the base becomes W − s·B₀N₀A₀ with the saved factors (in fp64)."""
        if getattr(self, "_residual_pending", False):
            with torch.no_grad():
                w = dense_weight(self.base_layer).double() - self.removed_from_base().double()
                set_dense_weight(self.base_layer, w.float())
            self._residual_pending = False

    def restore_base(self) -> nn.Module:
        """The base layer with the residual added back: W_res + s·B₀N₀A₀ (re-quantized when 4-bit)."""
        if self.residual_in_base and not _is_meta(self.base_layer):
            with torch.no_grad():
                set_dense_weight(self.base_layer, dense_weight(self.base_layer) + self.removed_from_base())
                self._forget_init()
        return self.base_layer

    def peft_factors(self) -> PeftFactors:
        """Relative to the original base, s·(B N A − B₀N₀A₀) as a rank-2r LoRA whose two products are each small:

            [s·((B − B₀) N + B₀ (N − N₀)), s·B₀N₀] · [A; A − A₀]

        (the first block is s·(B N − B₀N₀)·A, the second s·B₀N₀·(A − A₀); their sum is the update). The obvious
        [s·B N, −s·B₀N₀]·[A; A₀] multiplies two large terms that cancel: PEFT's fp32 matmuls then lost up to 2.1 %
        (relative max logits on SmolLM2 NF4). Built in fp64 from the differences, then rounded once to fp32.
        """
        if not self.nystrom:
            return Adapter.peft_factors(self)
        s = self.scale
        A, N, B = (t.detach().double() for t in (self.lora_A, self.lora_N, self.lora_B))
        b0, n0, a0 = (t.double() for t in (self.nlora_B0, self.nlora_N0, self.nlora_A0))
        d_bn = (B - b0) @ N + b0 @ (N - n0)  # (out, r) B N − B₀N₀ without forming either product
        b = torch.cat([s * d_bn, s * (b0 @ n0)], dim=1)  # (out, 2r)
        a = torch.cat([A, A - a0], dim=0)  # (2r, in)
        return PeftFactors(A=a.float(), B=b.float(), alpha=float(a.shape[0]))


# --------------------------------------------------------------------------------------------- IntTune


class IntTuneConfig(NLoRAConfig):
    kind: Literal["inttune"] = "inttune"  # type: ignore[assignment]


@register
class IntTune(NLoRA):
    kind = "inttune"
    Config = IntTuneConfig
    description = "IntTune: NLoRA init, A and B frozen, only the r×r N trains"

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **facts: Any):
        super().__init__(base_layer, config, name=name, **facts)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)

    def trainable_names(self) -> list[str]:
        return ["lora_N"]

    # A and B never move (they are not trained), so N₀ alone describes the initial value: B₀N₀A₀ = B N₀ A.
    def _register_state(self) -> None:
        if self.nystrom:
            r = self.config.rank
            self.register_buffer("inttune_N0", torch.zeros(r, r, device=self.lora_A.device))

    def initial_bn(self) -> torch.Tensor:
        return self.lora_B.detach().float() @ self.inttune_N0.float()

    def initial_a(self) -> torch.Tensor:
        return self.lora_A.detach().float()

    def _remember_init(self) -> None:
        self.inttune_N0.copy_(self.lora_N.detach())

    def _forget_init(self) -> None:
        self.inttune_N0.zero_()

    def factors(self) -> LowRank:
        if not self.nystrom or self.residual_in_base:
            return SLoRA.factors(self)
        # residual: adapter. s·B (N − N₀) A: rank r, zero at init.
        mid = self.lora_N - self.inttune_N0.to(self.lora_N.dtype)
        return LowRank(A=self.lora_A, B=self.lora_B, scale=self.scale, mid=mid)

    def peft_factors(self) -> PeftFactors:
        """s·B (N − N₀) A as a rank-r LoRA (A and B are frozen, so this equals s·(B N A − B₀N₀A₀))."""
        if not self.nystrom:
            return Adapter.peft_factors(self)
        n = self.lora_N.detach().float() - self.inttune_N0.float()  # (r, r)
        b = self.scale * (self.lora_B.detach().float() @ n)  # (out, r)
        return PeftFactors(A=self.lora_A.detach().float(), B=b, alpha=float(self.config.rank))
