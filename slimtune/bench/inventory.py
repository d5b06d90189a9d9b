"""What the estimator sizes, read from the real code: a meta-device model, the registry's injection, fuse_model.

``inventory(config, adapter_config, fuse=..., loram=...)`` builds the causal LM on the meta device (shapes only),
prunes it with LoRAM's own ``prune_model`` when asked (seeded random choice: the kept *counts* are the same for any
method), injects the adapters through the adapter registry (``slimtune.adapters.inject``), and runs ``fuse_model``
on it — the very calls a training run makes — then records per decoder layer its geometry (from the family's
``ArchSpec``; LoRAM: from the kept-index map), its linear weights and every adapter's trainable and frozen tensors.
So the estimate and the trainer cannot disagree on shapes, adapter tensors or fused-vs-unfused. Results are cached
per (config, adapter config, fuse, loram).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from slimtune.adapters.base import Adapter, get_adapter_class
from slimtune.adapters.counts import meta_model
from slimtune.adapters.inject import inject, is_linear, layer_index
from slimtune.errors import ModelError, SlimtuneError
from slimtune.loram.prune import prune_model
from slimtune.models.arch import ArchSpec, Geometry, known_model_types, spec_for
from slimtune.models.fused import fuse_model

__all__ = ["AdapterInfo", "LayerInfo", "ModelInventory", "inventory"]


@dataclass(frozen=True)
class AdapterInfo:
    """One adapted projection: its module name inside the layer block, the tensors it adds, its rank."""

    proj: str
    in_features: int
    rank: int
    trainable: tuple[int, ...]
    frozen: tuple[int, ...]


@dataclass
class LayerInfo:
    geometry: Geometry
    linear: tuple[int, ...]  # numel of every linear weight of the layer
    adapters: list[AdapterInfo] = field(default_factory=list)


@dataclass
class ModelInventory:
    spec: ArchSpec
    config: Any
    layers: list[LayerInfo]
    num_params: int  # the (pruned) base model, adapters excluded; tied weights once
    embed_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    other_params: int  # norms + biases
    extra_trainable: tuple[int, ...]  # modules_to_save tensors trained in full
    decoder_fused: bool  # fuse_model fused every decoder module
    loss_fused: bool  # the lm_head feeds the chunked linear cross-entropy
    fuse_unfused: tuple[tuple[str, str], ...]  # fuse_model's (module, why) list
    kept: Any = None  # LoRAM's KeptIndex

    @property
    def adapter_trainable(self) -> list[int]:
        return [n for layer in self.layers for a in layer.adapters for n in a.trainable] + list(self.extra_trainable)

    @property
    def adapter_frozen(self) -> list[int]:
        return [n for layer in self.layers for a in layer.adapters for n in a.frozen]

    @property
    def unfused_decoder(self) -> list[tuple[str, str]]:
        return [(n, w) for n, w in self.fuse_unfused if n != "lm_head+loss"]

    @property
    def adapted_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.adapters]


def _key(config: Any) -> str:
    return config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else json.dumps(config)


def inventory(config: Any, adapter_config: Any, *, fuse: bool, loram: dict | None = None) -> ModelInventory:
    """The inventory of ``config`` with ``adapter_config`` (an AdapterConfig of any registered kind)."""
    loram_key = None if loram is None else (float(loram["ratio"]), int(loram.get("keep_first", 0)),
                                            int(loram.get("keep_last", 0)))
    key = (_key(config), adapter_config.model_dump_json(), bool(fuse), loram_key)
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _build(config, key[1], key[2], loram_key)
    return _CACHE[key]


_CACHE: dict[tuple, ModelInventory] = {}  # a 70B meta model + injection + fuse takes about a second


def _build(config: Any, adapter_json: str, fuse: bool, loram: tuple | None) -> ModelInventory:
    spec = spec_for(config)
    if spec is None:
        raise ModelError(f"model_type {getattr(config, 'model_type', None)!r}: no family describes it "
                         f"(known: {', '.join(known_model_types())})")
    model = meta_model(config)
    kept = None
    if loram is not None:
        _, kept = prune_model(model, ratio=loram[0], keep_first=loram[1], keep_last=loram[2], method="random")
    layers = spec.decoder_layers(model)
    geo = spec.geometry(config)
    infos = [LayerInfo(_layer_geometry(geo, kept, i), _linear_numels(layer)) for i, layer in enumerate(layers)]
    params = {id(p): p.numel() for p in model.parameters()}
    num_params = sum(params.values())
    embed = spec.module(model, spec.embed).weight
    head = getattr(model, spec.lm_head, None)
    head_params = 0 if head is None or head.weight is embed else head.weight.numel()
    linear = sum(sum(i.linear) for i in infos)
    before = {id(p) for p in model.parameters()}

    data = json.loads(adapter_json)
    cls = get_adapter_class(data["kind"])
    cfg = cls.Config.model_validate(data)
    try:
        adapters = inject(model, cfg)
    except ValueError as err:
        raise SlimtuneError(f"adapter: {err}") from None
    for name, a in adapters.items():
        infos[layer_index(name)].adapters.append(_adapter_info(name, a))
    extra = tuple(p.numel() for p in model.parameters() if p.requires_grad and id(p) in before)

    decoder_fused = loss_fused = False
    unfused: tuple = ()
    if fuse:
        report = fuse_model(model)
        unfused = tuple(report.unfused)
        decoder_fused = not any(name != "lm_head+loss" for name, _ in unfused)
        loss_fused = "lm_head+loss" not in {name for name, _ in unfused}
    return ModelInventory(
        spec=spec, config=config, layers=infos, num_params=num_params, embed_params=embed.numel(),
        lm_head_params=head_params, other_params=num_params - embed.numel() - head_params - linear,
        extra_trainable=extra, decoder_fused=decoder_fused, loss_fused=loss_fused, fuse_unfused=unfused, kept=kept,
    )


def _layer_geometry(geo: Geometry, kept: Any, i: int) -> Geometry:
    """Layer i's geometry: the config's, or the kept-index map's for a LoRAM-pruned layer."""
    if kept is None or i not in kept.layers:
        return geo
    lk = kept.layers[i]
    return geo.with_(kv_heads=len(lk.kv_heads), heads=len(lk.kv_heads) * geo.group, intermediate=len(lk.neurons))


def _linear_numels(layer: nn.Module) -> tuple[int, ...]:
    return tuple(m.weight.numel() for _, m in layer.named_modules() if is_linear(m) and not isinstance(m, Adapter))


def _adapter_info(name: str, a: Adapter) -> AdapterInfo:
    own = [(n, p) for n, p in a.named_parameters() if not n.startswith("base_layer.")]
    # float buffers are adapter state too (LaMDA keeps the frozen columns of B in one)
    own += [(n, b) for n, b in a.named_buffers() if not n.startswith("base_layer.") and b.is_floating_point()]
    rank = getattr(a, "rank", None)
    if not isinstance(rank, int):
        rank = int(a.config.rank)
    return AdapterInfo(
        proj=name.rsplit(".", 1)[-1], in_features=int(a.in_features), rank=rank,
        trainable=tuple(p.numel() for _, p in own if p.requires_grad),
        frozen=tuple(p.numel() for _, p in own if not p.requires_grad),
    )
