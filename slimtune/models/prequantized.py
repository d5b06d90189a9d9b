"""Pre-quantized bitsandbytes 4-bit checkpoints, loaded as they are stored.

A folder (or hub repo) saved from a ``BitsAndBytesConfig(load_in_4bit=True)`` model — the ``unsloth/…-bnb-4bit``
repos are the usual choice for a 24 GB card — holds each quantized linear weight as its packed 4-bit bytes plus its
quant state, under bitsandbytes' serialisation names::

    model.layers.0.self_attn.q_proj.weight                              (out*in/2, 1) uint8: the packed codes
    model.layers.0.self_attn.q_proj.weight.absmax                       (n_blocks,) fp32, uint8 with double quant
    model.layers.0.self_attn.q_proj.weight.quant_map                    (16,) the NF4/FP4 code table
    model.layers.0.self_attn.q_proj.weight.nested_absmax / nested_quant_map     (double quant only)
    model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4        JSON: shape, blocksize, dtype, ...

``stream_prequantized`` builds the model empty and fills it one tensor at a time like ``stream_model``, but a 4-bit
weight becomes a ``Linear4bit`` holding exactly those bytes and that quant state (no second quantization; the quant
state declares the compute dtype, like a weight slimtune quantizes). The checkpoint's quantization decides (type,
blocksize, double quant, which layers are 4-bit), not the recipe's ``quant`` block, except that ``quant.mode: none``
asks for the dense model: each 4-bit weight is then dequantized to the compute dtype as it arrives (what a merge
onto the base, LoRAM's pruning or ``slimtune chat`` load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from slimtune.errors import ModelError
from slimtune.models.streaming import (
    _empty_model,
    _expected_names,
    _name_mismatch,
    _read_safetensors,
    _safetensors_header,
    _tied_head,
    finish_fill,
    linear4bit,
    release_host_memory,
    set_module,
)
from slimtune.ops.nf4 import NF4Weight, dense_weight

if TYPE_CHECKING:  # the recipe blocks, for annotations only (load.py imports this module)
    from slimtune.models.load import ModelConfig, QuantConfig

#: What bitsandbytes saves beside a 4-bit ``<module>.weight`` (``QuantState.as_dict(packed=True)``).
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
PACKED_STATE = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def bnb_4bit_config(config: dict | None, source: str) -> dict | None:
    """The ``quantization_config`` of a bitsandbytes 4-bit checkpoint's config (a dict), None for any other one.

    An 8-bit bitsandbytes checkpoint is refused (one line): its int8 weights are not a 4-bit base.
    """
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ModelError(f"model.name: {source} is an 8-bit bitsandbytes checkpoint: slimtune trains on a 4-bit "
                         "(NF4/FP4) base; use the 16-bit original or a 4-bit (bnb-4bit) checkpoint")
    return q if q.get("load_in_4bit") or q.get("_load_in_4bit") else None


def read_bnb_4bit_config(src: str, model_cfg: ModelConfig) -> dict | None:
    """:func:`bnb_4bit_config` of a local folder's ``config.json`` or a hub repo's config (None when unreadable:
    the ordinary load then reports the problem)."""
    path = Path(src) / "config.json"
    if path.is_file():
        try:
            return bnb_4bit_config(json.loads(path.read_text()), model_cfg.name)
        except (OSError, ValueError):
            return None
    if Path(src).exists():
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(src, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # offline, no such repo, ...: the ordinary path gives the one-line error
        return None
    q = getattr(config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    return bnb_4bit_config({"quantization_config": q}, model_cfg.name)


def quantized_names(keys) -> dict[str, str]:
    """Checkpoint tensor name → the 4-bit weight it belongs to, for every part of every 4-bit weight (the packed
    bytes included), from the names alone."""
    weights = {k[: -len(p) - 1] for k in keys for p in PACKED_STATE if k.endswith("." + p)}
    parts = {}
    for w in weights:
        parts[w] = w
        for p in (*QUANT_STATE_PARTS, *PACKED_STATE):
            if f"{w}.{p}" in keys:
                parts[f"{w}.{p}"] = w
    return parts


def stream_prequantized(
    files: list[Path], model_cfg: ModelConfig, quant_cfg: QuantConfig, *, device: torch.device, dtype: torch.dtype,
) -> tuple[nn.Module | None, str | None]:
    """The model of a pre-quantized bitsandbytes 4-bit checkpoint, filled one safetensors tensor at a time.

    4-bit weights keep their stored bytes and quant state (declaring ``dtype``); with ``quant.mode: none`` they are
    dequantized to ``dtype`` instead. Every other tensor is cast to ``dtype``. Returns (model, None), or (None, why)
    when the checkpoint's tensor names do not match the model.
    """
    from transformers import AutoConfig

    src = str(files[0].parent)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.name: cannot load {model_cfg.name}: {e}") from e
    if hasattr(config, "quantization_config"):  # the model built here is not a transformers-quantized one
        del config.quantization_config
    model = _empty_model(config, model_cfg, dtype)
    expected = _expected_names(model)
    header = {k: e for f in files for k, e in _safetensors_header(f)[0].items()}
    owner = quantized_names(header)  # checkpoint name -> the checkpoint name of the 4-bit weight it is part of
    names = {k: k if k in expected or f"model.{k}" not in expected else f"model.{k}" for k in header}
    why = _name_mismatch(model, expected, {names[k] for k in header if owner.get(k, k) == k})
    if why is not None:
        return None, why
    for w in set(owner.values()):
        mod_name = names[w].rpartition(".")[0]
        mod = model.get_submodule(mod_name)
        if not isinstance(mod, nn.Linear):
            return None, f"4-bit tensor {w} is the weight of a {type(mod).__name__}, not of a linear layer"
        if quant_cfg.mode != "none":  # an empty Linear4bit of the stored type; its weight is set by _fill
            fp4 = f"{w}.{PACKED_STATE[1]}" in header
            set_module(model, mod_name, linear4bit(mod, mode="fp4" if fp4 else "nf4", compute_dtype=dtype,
                                                   double_quant=f"{w}.nested_absmax" in header))

    def tensors():
        for f in files:
            yield from _read_safetensors(f)
            release_host_memory()

    _fill(model, tensors(), owner, names, dense=quant_cfg.mode == "none", device=device, dtype=dtype,
          source=model_cfg.name)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src)
    except Exception:  # no generation_config.json: keep the one from_config derived
        pass
    return model, None


def _fill(model: nn.Module, tensors, owner: dict[str, str], names: dict[str, str], *, dense: bool,
          device: torch.device, dtype: torch.dtype, source: str) -> None:
    """Place every checkpoint tensor: the parts of a 4-bit weight are held until its last one arrives (they are
    a few small tensors beside the packed bytes), then the weight is built; the rest is cast and placed."""
    tied = _tied_head(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    wanted = {w: sum(1 for v in owner.values() if v == w) for w in set(owner.values())}
    for key, t in tensors:
        name = names[key]
        if name == "lm_head.weight" and tied:
            continue  # the tied head is the embedding
        if key not in owner:
            _place(model, name, t.to(device, dtype) if t.is_floating_point() else t.to(device))
            continue
        w = owner[key]
        parts = pending.setdefault(w, {})
        parts[key[len(w) + 1:] if key != w else "weight"] = t
        if len(parts) == wanted[w]:
            del pending[w]
            _place_4bit(model, names[w], parts, dense=dense, device=device, dtype=dtype, source=source)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    finish_fill(model, device=device, dtype=dtype, source=source)


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _place_4bit(model: nn.Module, name: str, parts: dict[str, torch.Tensor], *, dense: bool, device: torch.device,
                dtype: torch.dtype, source: str) -> None:
    """Set the weight ``name`` from its stored parts: the packed bytes + quant state as they are, or dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    packed = parts.pop("weight").reshape(-1).view(torch.uint8).reshape(-1, 1).to(device)  # any storage dtype
    try:
        qs = bnbf.QuantState.from_dict(dict(parts), device=device)
    except (ValueError, KeyError, AssertionError) as e:
        raise ModelError(f"model.name: {source}: unreadable 4-bit quant state of {name}: {e}") from None
    mod = model.get_submodule(name.rpartition(".")[0])
    if tuple(qs.shape) != (mod.out_features, mod.in_features):
        raise ModelError(f"model.name: {source}: {name} is stored as a {tuple(qs.shape)} 4-bit weight, the model "
                         f"has ({mod.out_features}, {mod.in_features})")
    qs.dtype = dtype  # what bitsandbytes dequantizes to: the compute dtype (the codes and absmax do not change)
    if dense:
        mod.weight = nn.Parameter(dense_weight(NF4Weight.from_quant_state(packed, qs), dtype), requires_grad=False)
        return
    mod.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                   compress_statistics=qs.nested, quant_type=qs.quant_type,
                                   quant_storage=torch.uint8, bnb_quantized=True)
