"""The adapter interface and registry.

An adapter wraps one frozen base linear layer (``nn.Linear`` or bitsandbytes ``Linear4bit``) and adds a trainable
low-rank term. Conventions (DESIGN.md §2, same as PEFT): base W is (out, in), A is (r, in), B is (out, r), an
optional middle matrix M is (r, r), x is (..., in), and

    y = base(x) + scale · B M A drop(x)          (M = I when the kind has none)

Adding an adapter kind means adding one file in this package: a config class (pydantic, ``kind: Literal[...]``)
and an ``Adapter`` subclass decorated with ``@register``. The package discovers its modules on first use, so nothing
else needs editing: the recipe schema, the CLI listing and the contract tests all read the registry.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from slimtune.ops.nf4 import NF4Weight
from slimtune.ops.nf4 import dense_weight as dequantize

# --------------------------------------------------------------------------------------------- configs


class LayerRange(BaseModel):
    """LayRA-style layer selection: adapters on layers [0, first) and [L - last, L)."""

    model_config = ConfigDict(extra="forbid")
    first: int = Field(0, ge=0, description="Number of leading decoder layers that get adapters.")
    last: int = Field(0, ge=0, description="Number of trailing decoder layers that get adapters.")

    def indices(self, num_layers: int) -> list[int]:
        return sorted(set(range(min(self.first, num_layers))) | set(range(max(num_layers - self.last, 0), num_layers)))


class AdapterConfig(BaseModel):
    """Fields every adapter kind shares (the recipe's ``adapter:`` block)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: str
    rank: int = Field(16, gt=0, le=4096, description="Rank r of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: s = alpha / r (alpha / sqrt(r) for rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (0 keeps the fused path).")
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Module name suffixes (q_proj, down_proj, ...) or 're:<regex>'; 'all-linear' = every linear "
        "layer of the decoder (lm_head excluded).",
    )
    layers: LayerRange | list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Decoder layers that get adapters: {first: k, last: m} (LayRA) or a list; None = all."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapters (e.g. embed_tokens, lm_head), as in PEFT.",
    )

    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
        if isinstance(self.layers, LayerRange):
            return self.layers.indices(num_layers)
        outside = sorted(i for i in set(self.layers) if i >= num_layers)
        if outside:
            raise ValueError(f"adapter.layers: {outside} out of range (the model has {num_layers} decoder layers)")
        return sorted(set(self.layers))


# --------------------------------------------------------------------------------------------- base weights


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or bitsandbytes Linear4bit."""
    return int(layer.out_features), int(layer.in_features)


def is_4bit(layer: nn.Module) -> bool:
    return hasattr(getattr(layer, "weight", None), "quant_state") and layer.weight.quant_state is not None


def dense_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base weight (out, in) as a dense tensor (dequantized for 4-bit layers). Never cached here.

    For a dense layer already in ``dtype`` this is the weight itself (no copy): callers must not modify it. 4-bit
    layers go through the same dequantization as the fused ops' reference (``slimtune.ops.nf4.dense_weight``:
    bit-exact for every shape, bitsandbytes' native op where that is exact).
    """
    if isinstance(layer, Adapter):  # a frozen earlier-stage adapter under a stacked one: its merged weight
        return layer.merged_weight().to(dtype)
    if is_4bit(layer):
        qs = layer.weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):  # bnb's CPU inference layout: back to canonical
            import bitsandbytes.functional as bnbf

            layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                layer.weight.data, qs
            )
        return dequantize(NF4Weight.from_params4bit(layer.weight), dtype)
    return layer.weight.detach().to(dtype)


def set_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a base layer's weight (re-quantizing a 4-bit layer with its own quant settings)."""
    if is_4bit(layer):
        import bitsandbytes as bnb

        old = layer.weight
        qs = old.quant_state
        device = old.data.device
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", torch.float32).contiguous(),
            requires_grad=False,
            quant_type=qs.quant_type,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_storage=old.quant_storage if hasattr(old, "quant_storage") else torch.uint8,
        )
        layer.weight = new.to(device)
        layer.weight.quant_state.dtype = qs.dtype  # quantized from fp32; dequantizes to the dtype declared before
    else:
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight.dtype))


# --------------------------------------------------------------------------------------------- adapters


@dataclass
class LowRank:
    """The live factors of an adapter, as the fused kernels and exporters read them.

    y = base(x) + scale · B (M (A x)) — with DoRA's magnitude when ``magnitude`` is set.
    """

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    mid: torch.Tensor | None = None  # (r, r) or None
    magnitude: torch.Tensor | None = None  # (out,) DoRA magnitude or None


@dataclass
class PeftFactors:
    """One module's adapter in plain-LoRA (PEFT) form: delta = peft_scale · B @ A."""

    A: torch.Tensor  # (r', in)
    B: torch.Tensor  # (out, r')
    alpha: float
    rslora: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


class Adapter(nn.Module):
    """Base class: one base linear layer plus a low-rank trainable term.

    Subclasses set ``kind`` and ``Config`` and implement ``reset_parameters`` and ``factors``; they override
    ``trainable_names`` when not every parameter trains, and ``peft_factors`` when the update is not plain B A.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]
    description: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, *, name: str = "", **module_facts: Any):
        super().__init__()
        self.base_layer = base_layer
        self.module_facts = dict(module_facts)
        self.config = config
        self.name = name
        self.out_features, self.in_features = linear_shape(base_layer)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """Only under a stacked adapter (``inject(stack=True)`` sets ``stacked_under``): the weight of the linear
        layer under the stack, so the adapter over this one reads its device, dtype and quantization as from any
        base layer. Otherwise an adapter has no ``weight``."""
        if not self.__dict__.get("stacked_under", False):
            raise AttributeError("weight")
        base = self.base_layer
        while isinstance(base, Adapter):
            base = base.base_layer
        return base.weight

    # --- what a kind defines -----------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.config.scale()

    def reset_parameters(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def factors(self) -> LowRank:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_names(self) -> list[str]:
        """Names (relative to this module) of the parameters that train; default: all but the base layer's."""
        return [n for n, _ in self.named_parameters() if not n.startswith("base_layer.")]

    @classmethod
    def plan(cls, model: nn.Module, names: list[str], config: AdapterConfig) -> dict[str, dict[str, Any]]:
        """Per-module construction facts decided from the whole model (e.g. LaMDA++'s rank allocation).

        Returned dicts are passed to ``__init__`` as keyword arguments and saved with the adapter, so a load
        rebuilds the same shapes without recomputing. Default: nothing per module.
        """
        return {}

    def on_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (``step`` = number of steps done). Default: nothing."""

    def after_load(self) -> None:
        """Called after tensors were loaded into this adapter (drop caches). Default: nothing."""

    @classmethod
    def regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        """Extra loss terms of this kind over all its modules (KaSA's), added once per optimizer step; None: none."""
        return None

    @classmethod
    def init_from_data(cls, adapters: list[Adapter], model: nn.Module, batches: Iterable[dict],
                       loss_fn: Callable[[nn.Module, dict], torch.Tensor], lr: float) -> None:
        """Initialise from the training data before the first step (LoRA-SB: from the gradient). Default: nothing."""

    def select_rank(self, rank: int) -> None:
        """Run (eval, merge, export) at a lower rank: kinds with nested ranks (DyLoRA) override it."""
        raise ValueError(f"--rank {rank}: adapter kind {self.kind} has no nested ranks (dylora has)")

    def restore_base(self) -> nn.Module:
        """The base layer as it was before this adapter (``unload`` puts it back); a kind that changed the base
        (NLoRA's residual init) undoes that here. Default: the wrapped layer, untouched."""
        return self.base_layer

    def extra_adapter_config(self) -> dict[str, Any]:
        """Per-module facts saved with the adapter: by default what ``plan`` gave this module."""
        return dict(self.module_facts)

    # --- shared math -------------------------------------------------------------------------------
    @staticmethod
    def _apply_lowrank(x: torch.Tensor, f: LowRank) -> torch.Tensor:
        xa = x @ f.A.to(x.dtype).t()  # (..., r)
        if f.mid is not None:
            xa = xa @ f.mid.to(x.dtype).t()  # (..., r)
        return (xa @ f.B.to(x.dtype).t()) * f.scale  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        return y + self._apply_lowrank(self.dropout(x), self.factors()).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B M A as a dense fp32 (out, in) tensor."""
        f = self.factors()
        a = f.A.float()
        if f.mid is not None:
            a = f.mid.float() @ a
        return f.scale * (f.B.float() @ a)

    def merged_weight(self) -> torch.Tensor:
        """The dense fp32 weight that makes the merged layer equal to this adapted layer."""
        return dense_weight(self.base_layer) + self.delta_weight()

    def peft_factors(self) -> PeftFactors:
        """Plain-LoRA form for export: folds the middle matrix and the scale into B (scale 1)."""
        f = self.factors()
        b = f.B.float() if f.mid is None else f.B.float() @ f.mid.float()
        return PeftFactors(A=f.A.detach().float(), B=(f.scale * b).detach(), alpha=float(f.A.shape[0]))

    def trainable_parameter_count(self) -> int:
        params = dict(self.named_parameters())
        return sum(params[n].numel() for n in self.trainable_names())


# --------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Adapter]] = {}
_DISCOVERED = False
_NOT_ADAPTERS = {"base", "inject", "export"}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter kind known to recipes, the CLI and the tests."""
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"adapter kind {cls.kind!r} registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import slimtune.adapters as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _NOT_ADAPTERS and not mod.name.startswith("_"):
            importlib.import_module(f"slimtune.adapters.{mod.name}")
    _DISCOVERED = True


def registry() -> dict[str, type[Adapter]]:
    """All adapter kinds, by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_adapter_class(kind: str) -> type[Adapter]:
    reg = registry()
    if kind not in reg:
        raise KeyError(f"unknown adapter kind {kind!r}; known: {', '.join(reg)}")
    return reg[kind]


_MODES: dict[str, type[AdapterConfig]] = {}


def register_mode(config: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator for a training mode that wraps no layer (``full``: the model's own weights train). Its
    config joins the recipe's ``adapter:`` union; it is not an ``Adapter`` kind (no factors, no PEFT export)."""
    _MODES[config.model_fields["kind"].default] = config
    return config


def modes() -> dict[str, type[AdapterConfig]]:
    """Training modes that are not adapter kinds, by name."""
    _discover()
    return dict(sorted(_MODES.items()))


def adapter_config_union() -> Any:
    """A pydantic type: the union of every registered kind's config (and mode's), discriminated by ``kind``."""
    configs = tuple(cls.Config for cls in registry().values()) + tuple(modes().values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007


def regularization(adapters: dict[str, Adapter]) -> torch.Tensor | None:
    """The extra loss of the adapters' kind (``Adapter.regularization``), or None when the kind has none."""
    items = list(adapters.values())
    return type(items[0]).regularization(items) if items else None


def init_from_data(adapters: dict[str, Adapter], model: nn.Module, batches: Iterable[dict],
                   loss_fn: Callable[[nn.Module, dict], torch.Tensor], lr: float) -> None:
    """The kind's data-dependent initialisation (``Adapter.init_from_data``): the trainer calls it once in setup."""
    items = list(adapters.values())
    if items:
        type(items[0]).init_from_data(items, model, batches, loss_fn, lr)


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA A init: kaiming-uniform with a = sqrt(5) over the fan-in (last dim)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def cast_trainable(adapters: dict[str, Adapter] | list[Adapter], dtype: torch.dtype) -> int:
    """Store every trainable adapter tensor in ``dtype`` (e.g. bf16: 2 B/value for the weight and its gradient;
    the fp32 master copy then lives in the optimizer, ``slimtune.train.optim.MasterWeights``). Frozen tensors and
    the base layer are untouched. Returns the number of values cast."""
    n = 0
    for a in adapters.values() if isinstance(adapters, dict) else adapters:
        params = dict(a.named_parameters())
        for name in a.trainable_names():
            p = params[name]
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += p.numel()
    if hasattr(adapters, "values"):
        for a in adapters.values():
            a.after_load()  # kinds that cache derived tensors rebuild them in the new dtype
    return n
