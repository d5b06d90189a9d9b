"""Put adapters on a model: target matching, layer selection (LayRA), freezing, merging and unloading."""

from __future__ import annotations

import contextvars
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from slimtune.adapters.base import Adapter, AdapterConfig, get_adapter_class, is_4bit

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LOADING = contextvars.ContextVar("slimtune_adapter_loading", default=False)


def loading_saved() -> bool:
    """True while `inject` rebuilds adapters whose tensors are about to be loaded from a saved adapter.

    A kind whose initialisation is expensive (LaMDA's SVD) or changes the base (NLoRA's residual) skips it then:
    the saved tensors are the result of that initialisation, and recomputing it would cost minutes and could
    differ from what was trained (a re-quantized base, another device's SVD).
    """
    return _LOADING.get()


@contextmanager
def _loading(active: bool):
    token = _LOADING.set(active)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes 4-bit linear (the two bases an adapter can sit on)."""
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)
    except ImportError:  # pragma: no cover
        return False


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (``model.model.layers`` for Llama/Qwen2/Mistral-style causal LMs)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError("could not find the decoder layers (a ModuleList named 'layers')")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _matches(name: str, targets: str | list[str]) -> bool:
    if targets == "all-linear":
        return True
    leaf = name.rsplit(".", 1)[-1]
    for t in targets:
        if t.startswith("re:"):
            if re.search(t[3:], name):
                return True
        elif leaf == t or name.endswith("." + t) or name == t:
            return True
    return False


def find_targets(model: nn.Module, config: AdapterConfig, *, stack: bool = False) -> list[str]:
    """Names of the linear layers inside decoder layers that the config targets (lm_head is never a target).

    ``stack=True``: the targets are the model's (top-level) adapters instead, to put a new adapter over each.
    """
    num_layers = len(decoder_layers(model))
    allowed = set(config.layer_indices(num_layers))
    out = []
    for name, module in model.named_modules():
        idx = layer_index(name)
        if idx is None or idx not in allowed or ".base_layer" in name:
            continue
        if (not isinstance(module, Adapter)) if stack else (not is_linear(module) or isinstance(module, Adapter)):
            continue
        if _matches(name, config.targets):
            out.append(name)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def inject(
    model: nn.Module, config: AdapterConfig, *, module_meta: dict[str, dict] | None = None, init: bool = True,
    stack: bool = False,
) -> dict[str, Adapter]:
    """Freeze the model and wrap every targeted linear layer in an adapter of ``config.kind``.

    Returns the adapters by module name. ``config.modules_to_save`` modules (e.g. embed_tokens) are unfrozen.
    ``module_meta`` (from a saved adapter) replaces the kind's ``plan`` so a load rebuilds the same shapes;
    ``init=False`` (a load: the saved tensors follow) lets kinds skip their initialisation (`loading_saved`).
    ``stack=True`` wraps the model's existing adapters instead (kept frozen as the new adapters' base layers:
    y = base(x) + Δ₁x + Δ₂x, see ``slimtune.adapters.export.stack_on``).
    Raises ValueError when nothing matches (a typo in ``targets`` must not silently train nothing).
    """
    cls = get_adapter_class(config.kind)
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_targets(model, config, stack=stack)
    if not names:
        raise ValueError(f"adapter.targets {config.targets!r} matched no linear layer of the decoder")
    facts = module_meta if module_meta is not None else cls.plan(model, names, config)
    adapters: dict[str, Adapter] = {}
    with _loading(not init):
        for name in names:
            base = model.get_submodule(name)
            if stack:
                base.stacked_under = True  # the frozen adapter now plays a base layer (Adapter.weight)
            adapter = cls(base, config, name=name, **facts.get(name, {}))
            _set_module(model, name, adapter)
            adapters[name] = adapter
    prepare_adapters(adapters)
    for mod_name in config.modules_to_save:
        found = [m for n, m in model.named_modules() if n == mod_name or n.endswith("." + mod_name)]
        if not found:
            raise ValueError(f"adapter.modules_to_save: no module named {mod_name!r}")
        for m in found:
            for p in m.parameters():
                p.requires_grad_(True)
    return adapters


def prepare_adapters(adapters: dict[str, Adapter]) -> None:
    """Set requires_grad from each adapter's declared trainable names (base layers stay frozen)."""
    for adapter in adapters.values():
        trainable = set(adapter.trainable_names())
        for n, p in adapter.named_parameters():
            p.requires_grad_(n in trainable)


def adapters_of(model: nn.Module) -> dict[str, Adapter]:
    """The model's adapters by module name; a frozen adapter stacked under another (its ``base_layer``) is part of
    that one, not listed."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter) and not n.endswith(".base_layer")}


def innermost_base(adapter: Adapter) -> nn.Module:
    """The linear layer under an adapter (under every stacked adapter)."""
    base = adapter.base_layer
    while isinstance(base, Adapter):
        base = base.base_layer
    return base


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapter by a dense nn.Linear holding the merged weight (4-bit bases are dequantized).

    Exact up to the dtype: merged(x) equals the adapted layer's output computed in that dtype.
    """
    for name, adapter in list(adapters_of(model).items()):
        base = innermost_base(adapter)
        w = adapter.merged_weight()  # (out, in) fp32; stacked adapters: base + every Δ
        out_dtype = dtype or (getattr(base, "compute_dtype", None) if is_4bit(base) else base.weight.dtype)
        out_dtype = out_dtype or torch.float32
        bias = getattr(base, "bias", None)
        lin = nn.Linear(adapter.in_features, adapter.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight = nn.Parameter(w.to(out_dtype), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        _set_module(model, name, lin)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter, putting the original base layers back (stacked adapters: all of them)."""
    while adapters_of(model):
        for name, adapter in list(adapters_of(model).items()):
            _set_module(model, name, adapter.restore_base())
    return model
