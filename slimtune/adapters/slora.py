"""Three-matrix adapters with a trainable middle: SLoRA, NLoRA and IntTune (Guo et al. 2025).

    y = W x + s · B N A x        A (r, in), N (r, r), B (out, r), s = alpha / r

- **SLoRA**: A kaiming, N kaiming, B = 0 (ΔW = 0 at step 0); A, N and B all train.
- **NLoRA**: Nyström initialisation from the base weight W (dequantized when 4-bit): C = W[:, :r] (out, r),
  R = W[:r, :] (r, in), U = W[:r, :r]; B = C, A = R, N = pinv(U), so B N A is the Nyström approximation of W.
  Because B N A ≠ 0 the base is made *residual*, W_res = W − s·B₀N₀A₀, so the adapted model starts exactly where the
  original did (up to fp32 rounding on a dense base; a 4-bit base is re-quantized, which adds one quantization
  error: the log and the saved adapter config say so). ``init: as_released`` reproduces the public code instead:
  N = U and no residual (the model does not start at the original).
- **IntTune**: the NLoRA initialisation, then A and B frozen: only N trains (r² per module).

Residual bookkeeping. Merging is the plain W_res + s·B N A = W + s·(B N A − B₀N₀A₀): the original base plus the
trained change. The PEFT export is relative to the *original* base, so NLoRA keeps B₀N₀ (out, r) and A₀ (r, in) as
buffers and exports the rank-2r LoRA s·[B N, −B₀N₀]·[A; A₀]. IntTune's A and B never move (they are not trained),
so it keeps only N₀ (r, r) and exports the exact rank-r LoRA s·B (N − N₀)·A. ``restore_base`` (used by unload)
adds the residual back.
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
        description="nystrom: B = W[:, :r], N = pinv(W[:r, :r]), A = W[:r, :] with a residual base W − s·B N A (the "
        "model starts at the original); as_released: N = W[:r, :r] and no residual, as in the public code.",
    )


def nystrom_factors(w: torch.Tensor, r: int, *, pinv: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, N, R) of w (out, in): C = w[:, :r] (out, r), N = pinv(w[:r, :r]) or w[:r, :r] (r, r), R = w[:r, :] (r, in)."""
    out_f, in_f = w.shape
    if r > min(out_f, in_f):
        raise ValueError(f"Nyström init needs rank ≤ min(out, in) = {min(out_f, in_f)}, got rank {r}")
    u = w[:r, :r]
    n = torch.linalg.pinv(u.double()).to(w.dtype) if pinv else u.clone()
    return w[:, :r].clone(), n, w[:r, :].clone()


@register
class NLoRA(SLoRA):
    kind = "nlora"
    Config = NLoRAConfig
    description = "NLoRA: SLoRA with a Nyström init from W and a residual base (exact start)"

    @property
    def residual(self) -> bool:
        return self.config.init == "nystrom"

    def _register_state(self) -> None:
        if self.residual:  # zero until the first init: then the "original" weight below is the base itself
            device = self.lora_A.device
            self.register_buffer("nlora_B0N0", torch.zeros(self.out_features, self.config.rank, device=device))
            self.register_buffer("nlora_A0", torch.zeros(self.config.rank, self.in_features, device=device))

    @classmethod
    def plan(cls, model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, dict[str, Any]]:
        if config.init != "nystrom":
            return {}
        requant = [n for n in names if is_4bit(model.get_submodule(n))]
        if requant:
            log.warning(
                "%s: the base of %d/%d target layers is made residual (W − s·B N A) and re-quantized to 4 bits; the "
                "adapted model starts at the original up to one extra quantization error",
                cls.kind, len(requant), len(names),
            )
        else:
            log.info("%s: the base of %d target layers is made residual (W − s·B N A)", cls.kind, len(names))
        return {n: {"residual_base": "re-quantized 4-bit" if n in requant else "dense"} for n in names}

    # --- residual bookkeeping (what the subclass IntTune stores differently) -----------------------
    def residual_delta(self) -> torch.Tensor:
        """s·B₀N₀A₀ (out, in) fp32: what was taken out of the base (zero before the init and without residual)."""
        if not self.residual:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        return self.scale * (self.nlora_B0N0.float() @ self.nlora_A0.float())

    def _remember_init(self) -> None:
        self.nlora_B0N0.copy_(self.lora_B.detach() @ self.lora_N.detach())
        self.nlora_A0.copy_(self.lora_A.detach())

    def reset_parameters(self) -> None:
        """Nyström init from the original weight (the base plus what an earlier init took out of it)."""
        if _is_meta(self.base_layer):  # shapes only (parameter counts)
            super().reset_parameters()
            return
        with torch.no_grad():
            w = dense_weight(self.base_layer) + self.residual_delta()  # (out, in) fp32 original; a fresh tensor
            c, n, r = nystrom_factors(w, self.config.rank, pinv=self.residual)
            self.lora_B.copy_(c)
            self.lora_N.copy_(n)
            self.lora_A.copy_(r)
            if self.residual:
                self._remember_init()
                bna = (c.double() @ n.double() @ r.double()) * self.scale  # (out, in) in fp64: cancellation-safe
                set_dense_weight(self.base_layer, (w.double() - bna).float())
            del w

    def restore_base(self) -> nn.Module:
        """The base layer with the residual added back: W_res + s·B₀N₀A₀ (re-quantized when 4-bit)."""
        if self.residual and not _is_meta(self.base_layer):
            with torch.no_grad():
                set_dense_weight(self.base_layer, dense_weight(self.base_layer) + self.residual_delta())
                self._clear_residual()
        return self.base_layer

    def _clear_residual(self) -> None:
        self.nlora_B0N0.zero_()
        self.nlora_A0.zero_()

    def peft_factors(self) -> PeftFactors:
        """Relative to the original base: s·(B N A − B₀N₀A₀) = [s·B N, −s·B₀N₀] · [A; A₀] (rank 2r, scale 1)."""
        if not self.residual:
            return super().peft_factors()
        s = self.scale
        bn = self.lora_B.detach().float() @ self.lora_N.detach().float()  # (out, r)
        b = torch.cat([s * bn, -s * self.nlora_B0N0.float()], dim=1)  # (out, 2r)
        a = torch.cat([self.lora_A.detach().float(), self.nlora_A0.float()], dim=0)  # (2r, in)
        return PeftFactors(A=a, B=b, alpha=float(a.shape[0]))


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

    def _register_state(self) -> None:
        if self.residual:  # A and B are frozen, so N₀ alone describes what was taken out of the base
            self.register_buffer("inttune_N0", torch.zeros(self.config.rank, self.config.rank, device=self.lora_A.device))

    def residual_delta(self) -> torch.Tensor:
        if not self.residual:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        return self.scale * (self.lora_B.float() @ self.inttune_N0.float() @ self.lora_A.float())

    def _remember_init(self) -> None:
        self.inttune_N0.copy_(self.lora_N.detach())

    def _clear_residual(self) -> None:
        self.inttune_N0.zero_()

    def peft_factors(self) -> PeftFactors:
        """s·B (N − N₀) A as a rank-r LoRA (A and B are frozen, so this equals s·(B N A − B₀N₀A₀))."""
        if not self.residual:
            return SLoRA.peft_factors(self)
        n = self.lora_N.detach().float() - self.inttune_N0.float()  # (r, r)
        b = self.scale * (self.lora_B.detach().float() @ n)  # (out, r)
        return PeftFactors(A=self.lora_A.detach().float(), B=b, alpha=float(self.config.rank))
