"""What a model family is, in one place: ``ArchSpec``, a registry keyed by the HF ``model_type``.

One small file per family in ``slimtune/models/families/`` builds an ``ArchSpec`` and calls :func:`register`; the
package is discovered on first use (like the adapter registry), so adding a family is adding one file:

    spec = spec_for(config)            # or spec_for("qwen3"); None for a model_type no family describes
    spec.decoder_layers(model)         # the nn.ModuleList at spec.decoder ("model.layers")
    spec.geometry(config)              # hidden / intermediate / heads / KV heads / head_dim / layers / vocab
    spec.shapes(geo)                   # {"q_proj": (out, in), ...} of one decoder layer, packed modules included
    spec.biases(config)                # {"q_proj": True, ...}: which projections carry a bias

Everything that needs to know a family reads its spec: ``fuse_model`` (which modules to swap, the norm offset, the
MLP activation, the softcaps, packed splits), the parameter counts and the memory estimator (shapes, biases, norms,
fused or not), LoRAM prune/recover (which dimension of which projection a KV group / neuron owns), the tiny test
configs (``tiny``) and the GGUF exporter (``gguf_arch``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = [
    "ArchSpec",
    "Geometry",
    "Proj",
    "all_specs",
    "register",
    "spec_for",
]

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Proj:
    """One linear module of a decoder layer.

    ``name`` is the attribute on its block (``q_proj``; Phi-3's packed ``qkv_proj``), ``block`` "attn" or "mlp",
    ``parts`` the roles it computes, in output order (("q",), or ("q", "k", "v") for a packed module; the output
    splits at the parts' sizes). ``prune`` is the weight dimension LoRAM shrinks: "out" (rows: q/k/v/gate/up) or
    "in" (columns: o/down).
    """

    name: str
    block: str
    parts: tuple[str, ...]
    prune: str

    @property
    def packed(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class Geometry:
    """The shapes of one decoder layer (and the model's vocabulary and layer count)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @property
    def group(self) -> int:
        """Query heads per KV head (G)."""
        return self.heads // self.kv_heads

    def with_(self, **changes: int) -> Geometry:
        return Geometry(**{**self.__dict__, **changes})

    def role_out(self, role: str) -> int:
        """Output size of one role's projection."""
        return {"q": self.heads * self.head_dim, "k": self.kv_heads * self.head_dim,
                "v": self.kv_heads * self.head_dim, "o": self.hidden, "gate": self.intermediate,
                "up": self.intermediate, "down": self.hidden}[role]

    def role_in(self, role: str) -> int:
        return {"o": self.heads * self.head_dim, "down": self.intermediate}.get(role, self.hidden)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _activation(config: Any) -> str:
    """The MLP activation as slimtune names it: "silu" or "gelu_tanh" (HF: gelu_pytorch_tanh / gelu_new)."""
    act = _get(config, "hidden_activation") or _get(config, "hidden_act") or "silu"
    return {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(str(act), str(act))


def _default_biases(config: Any, spec: ArchSpec) -> dict[str, bool]:
    """Llama's rule: ``attention_bias`` for every attention projection, ``mlp_bias`` for every MLP one."""
    attn, mlp = bool(_get(config, "attention_bias", False)), bool(_get(config, "mlp_bias", False))
    return {p.name: attn if p.block == "attn" else mlp for p in spec.projections}


def _none(config: Any) -> Any:
    return None


def _no_reason(config: Any) -> str | None:
    return None


@dataclass(frozen=True)
class ArchSpec:
    """Everything slimtune needs to know about one decoder-only family (see the module docstring).

    Callables take the HF config (or its dict). Defaults describe Llama; a family file overrides what differs.
    """

    model_types: tuple[str, ...]
    gguf_arch: str  # llama.cpp's general.architecture
    projections: tuple[Proj, ...]
    decoder: str = "model.layers"
    final_norm: str = "model.norm"
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # RMSNorms of a decoder layer, in the order they run; "pre" norms feed a fused projection (their output is the
    # projection's saved input), "post" norms (Gemma's post_attention/post_feedforward) feed the residual add.
    layer_norms: tuple[tuple[str, str], ...] = (("input_layernorm", "pre"), ("post_attention_layernorm", "pre"))
    qk_norm: bool = False  # per-head RMSNorm on q and k (attention's q_norm / k_norm), before RoPE
    norm_offset: float = 0.0  # RMSNorm weight is (offset + w): Gemma stores w around 0 and uses 1 + w
    norm_cast: str = "weight_after_cast"  # Llama: w · x̂.to(dtype); Gemma "fp32": (x̂ · (1 + w)).to(dtype)
    # (slimtune.ops.rms_norm casts the Gemma way exactly when offset != 0; fuse_model refuses another pairing)
    activation: Callable[[Any], str] = _activation
    attn_softcap: Callable[[Any], float | None] = _none  # tanh cap on attention logits (Gemma 2)
    final_softcap: Callable[[Any], float | None] = _none  # tanh cap on the output logits (Gemma 2)
    sliding_window: Callable[[Any], int | None] = _none  # the window of the sliding layers, None without
    biases: Callable[[Any, ArchSpec], dict[str, bool]] = _default_biases
    embed_scale: Callable[[Any], float] = lambda c: 1.0  # Gemma: sqrt(hidden), applied in HF's embedding module
    fusable: Callable[[Any], str | None] = _no_reason  # None when fuse_model can take the family, else why not
    needs_eager_attention: Callable[[Any], bool] = lambda c: False  # softcapped attention: no SDPA kernel
    loram_prunable: Callable[[Any], str | None] = _no_reason  # None when LoRAM can prune whole KV groups, else why
    rope_per_layer_type: bool = False  # one cos/sin pair per layer type (Gemma 3: local and global RoPE bases)
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides of the 2-layer test model

    # ---- names and lookups
    @property
    def name(self) -> str:
        return self.model_types[0]

    def proj(self, name: str) -> Proj:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no projection {name!r} (has {', '.join(self.proj_names)})")

    @property
    def proj_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.projections)

    def block_of(self, proj: str) -> str:
        """The attribute path of a projection inside a decoder layer: 'self_attn.q_proj'."""
        p = self.proj(proj)
        return f"{self.attn if p.block == 'attn' else self.mlp}.{p.name}"

    def role_proj(self, role: str) -> Proj:
        """The (possibly packed) projection that computes ``role``."""
        for p in self.projections:
            if role in p.parts:
                return p
        raise KeyError(role)

    # ---- geometry
    def geometry(self, config: Any) -> Geometry:
        hidden = int(_get(config, "hidden_size"))
        heads = int(_get(config, "num_attention_heads"))
        kv = int(_get(config, "num_key_value_heads") or heads)
        head_dim = int(_get(config, "head_dim") or hidden // heads)
        return Geometry(hidden=hidden, intermediate=int(_get(config, "intermediate_size")), heads=heads,
                        kv_heads=kv, head_dim=head_dim, layers=int(_get(config, "num_hidden_layers")),
                        vocab=int(_get(config, "vocab_size")))

    def shapes(self, geo: Geometry) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear module of one decoder layer of geometry ``geo``."""
        return {p.name: (sum(geo.role_out(r) for r in p.parts), geo.role_in(p.parts[0])) for p in self.projections}

    def split_sizes(self, proj: str, geo: Geometry) -> list[int]:
        """Output sizes of a packed module's parts (Phi-3 qkv_proj: [Hq·D, Hk·D, Hk·D])."""
        return [geo.role_out(r) for r in self.proj(proj).parts]

    def norm_params_per_layer(self, geo: Geometry) -> int:
        return len(self.layer_norms) * geo.hidden + (2 * geo.head_dim if self.qk_norm else 0)

    def bias_map(self, config: Any) -> dict[str, bool]:
        """Which linear modules of a layer carry a bias, by module name."""
        return self.biases(config, self)

    def tied(self, config: Any) -> bool:
        return bool(_get(config, "tie_word_embeddings", False))

    # ---- module access
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList | None:
        obj: Any = model
        for part in self.decoder.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, nn.ModuleList) else None

    def module(self, model: nn.Module, path: str) -> nn.Module | None:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        return obj

    def sliding_layer(self, config: Any, i: int) -> bool:
        """Whether layer i attends through the sliding window (``layer_types``, else every layer when the family
        has a window)."""
        if self.sliding_window(config) is None:
            return False
        types = _get(config, "layer_types")
        return types[i] == "sliding_attention" if types else True

    def rope_sets(self, config: Any) -> int:
        """How many distinct cos/sin pairs the model computes per forward."""
        types = _get(config, "layer_types")
        return len(set(types)) if self.rope_per_layer_type and types else 1

    def why_not_fused(self, config: Any) -> str | None:
        """None when fuse_model takes this family (the per-module checks still apply), else the reason."""
        return self.fusable(config)


# --------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, ArchSpec] = {}
_DISCOVERED = False


def register(spec: ArchSpec) -> ArchSpec:
    """Add a family (one call per family file); every ``model_type`` it lists maps to it."""
    for mt in spec.model_types:
        if mt in _REGISTRY and _REGISTRY[mt] is not spec:
            raise ValueError(f"model_type {mt!r} registered twice")
        _REGISTRY[mt] = spec
    return spec


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    pkg = importlib.import_module("slimtune.models.families")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"slimtune.models.families.{mod.name}")


def all_specs() -> dict[str, ArchSpec]:
    """model_type -> spec, every registered family."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def spec_for(model_type_or_config: Any) -> ArchSpec | None:
    """The spec of a ``model_type`` string, an HF config / config dict, or a model (its ``.config``)."""
    _discover()
    x = model_type_or_config
    if isinstance(x, nn.Module):
        x = getattr(x, "config", None)
    mt = x if isinstance(x, str) else _get(x, "model_type") if x is not None else None
    return _REGISTRY.get(str(mt)) if mt else None


def known_model_types() -> tuple[str, ...]:
    return tuple(all_specs())


# Standard projection tables (a family file picks one, or writes its own).
SEPARATE_QKV = (
    Proj("q_proj", "attn", ("q",), "out"),
    Proj("k_proj", "attn", ("k",), "out"),
    Proj("v_proj", "attn", ("v",), "out"),
    Proj("o_proj", "attn", ("o",), "in"),
)
GATED_MLP = (
    Proj("gate_proj", "mlp", ("gate",), "out"),
    Proj("up_proj", "mlp", ("up",), "out"),
    Proj("down_proj", "mlp", ("down",), "in"),
)
LLAMA_PROJECTIONS = SEPARATE_QKV + GATED_MLP
