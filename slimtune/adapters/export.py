"""Saving and loading adapters: slimtune's native format (exact resume) and PEFT's format (interop).

Native: ``slimtune_adapter.json`` (kind, config, per-kind facts) + ``adapter_state.safetensors`` (every adapter
tensor, trainable or frozen, keyed by module name). A stacked adapter (``stack_on``: trained over an earlier
stage's adapter kept frozen) saves its own tensors and ``stacked_on``, the earlier adapter's folder, which
``load_native`` loads first. PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``
loadable by ``PeftModel.from_pretrained`` with identical outputs (DESIGN.md §6): three-matrix adapters are folded
into plain LoRA (B' = s·B M with scale 1), per-module ranks go to ``rank_pattern`` / ``alpha_pattern``; stacked
adapters export their combined delta Δ₁ + Δ₂ as one plain LoRA of rank r₁ + r₂ ([s₁B₁, s₂B₂]·[A₁; A₂], exact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slimtune.adapters.base import Adapter, PeftFactors, get_adapter_class
from slimtune.adapters.inject import adapters_of, decoder_layers, inject, layer_index

NATIVE_CONFIG = "slimtune_adapter.json"
NATIVE_WEIGHTS = "adapter_state.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, adapter in adapters_of(model).items():
        for pname, t in list(adapter.named_parameters()) + list(adapter.named_buffers()):
            if not pname.startswith("base_layer."):
                state[f"{name}.{pname}"] = t.detach().cpu().contiguous()
    return state


def _saved_modules(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mod_name in names:
        for n, m in model.named_modules():
            if n == mod_name or n.endswith("." + mod_name):
                for pn, p in m.named_parameters():
                    t = p.detach().cpu().contiguous()
                    # tied weights (embed_tokens and lm_head of a tied model) are one parameter: safetensors refuses
                    # shared storage, so the second name gets its own copy (loading writes both into the one tensor)
                    state[f"{n}.{pn}"] = t.clone() if id(p) in seen else t
                    seen.add(id(p))
    return state


STACKED_ATTR = "slimtune_stacked_on"  # model attribute: the frozen adapter folder its adapters are stacked on


def stack_on(model: nn.Module, frozen: str | Path, config: Any, *, init: bool = True,
             module_meta: dict[str, dict] | None = None) -> dict[str, Adapter]:
    """Load the adapter at ``frozen``, freeze it, and put a new ``config`` adapter over each of its modules.

    The forward is then base(x) + Δ₁x (frozen, exactly as trained) + Δ₂x (trained): chaining stages without merging
    and re-quantizing. Returns the new adapters. The new adapter must target exactly the earlier one's modules.
    """
    frozen = Path(frozen).resolve()
    load_native(model, frozen)
    earlier = set(adapters_of(model))
    adapters = inject(model, config, init=init, stack=True, module_meta=module_meta)
    if set(adapters) != earlier:
        missing = sorted(earlier - set(adapters))[:1] or ["-"]
        raise ValueError(f"adapter: a stacked adapter must sit on every module of the earlier stage's adapter "
                         f"({len(adapters)} of {len(earlier)} matched; first left out: {missing[0]})")
    setattr(model, STACKED_ATTR, str(frozen))
    return adapters


def save_native(model: nn.Module, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write every adapter tensor and the config: enough to rebuild the adapted model exactly."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters = adapters_of(model)
    if not adapters:
        raise ValueError("model has no adapters to save")
    first = next(iter(adapters.values()))
    state = _adapter_state(model)
    state.update(_saved_modules(model, first.config.modules_to_save))
    save_file(state, str(out / NATIVE_WEIGHTS))
    meta = {
        "kind": first.kind,
        "config": first.config.model_dump(mode="json"),
        "modules": {n: a.extra_adapter_config() for n, a in adapters.items()},
        **(extra or {}),
    }
    if getattr(model, STACKED_ATTR, None):
        meta["stacked_on"] = getattr(model, STACKED_ATTR)
    (out / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def load_native(model: nn.Module, path: str | Path, *, inject_if_missing: bool = True) -> dict[str, Adapter]:
    """Load a native adapter into ``model`` (injecting adapters of the saved kind first when needed)."""
    path = Path(path)
    meta = json.loads((path / NATIVE_CONFIG).read_text())
    adapters = adapters_of(model)
    if not adapters and inject_if_missing:
        cls = get_adapter_class(meta["kind"])
        config = cls.Config.model_validate(meta["config"])
        if meta.get("stacked_on"):
            adapters = stack_on(model, meta["stacked_on"], config, init=False, module_meta=meta.get("modules"))
        else:
            adapters = inject(model, config, module_meta=meta.get("modules"), init=False)
    state = load_file(str(path / NATIVE_WEIGHTS))
    own = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    missing = []
    with torch.no_grad():
        for key, value in state.items():
            target = own.get(key)
            if target is None:
                missing.append(key)
                continue
            if target.shape != value.shape:
                raise ValueError(f"{path}: tensor {key} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))
    if missing:
        raise ValueError(f"{path}: {len(missing)} saved tensors do not fit this model (first: {missing[0]})")
    for a in adapters.values():
        a.after_load()
    return adapters


def _stack(adapter: Adapter) -> list[Adapter]:
    """The adapter and the frozen adapters stacked under it, outermost first."""
    chain = [adapter]
    while isinstance(chain[-1].base_layer, Adapter):
        chain.append(chain[-1].base_layer)
    return chain


def _combined_peft(adapter: Adapter) -> PeftFactors:
    """One module's PEFT factors; stacked adapters: every delta in one plain LoRA with scale 1."""
    chain = _stack(adapter)
    if len(chain) == 1:
        return adapter.peft_factors()
    parts = [a.peft_factors() for a in chain]
    if any(f.magnitude is not None for f in parts):
        raise ValueError(f"{adapter.name}: stacked DoRA adapters have no PEFT form (merge the model instead)")
    scales = [f.alpha / (math.sqrt(f.rank) if f.rslora else f.rank) for f in parts]
    A = torch.cat([f.A.float() for f in parts], dim=0)  # (r1 + r2, in)
    B = torch.cat([s * f.B.float() for s, f in zip(scales, parts)], dim=1)  # (out, r1 + r2)
    return PeftFactors(A=A, B=B, alpha=float(A.shape[0]), rslora=False)


def export_peft(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                tokenizer: Any = None, metadata: dict | None = None) -> Path:
    """Write the adapters in PEFT's LoRA format (see module docstring). ``tokenizer`` (with the chat template
    used in training) is saved beside them; ``metadata`` goes to slimtune.json (e.g. the base's ``pkg:`` spec)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters = adapters_of(model)
    if not adapters:
        raise ValueError("model has no adapters to export")
    first = next(iter(adapters.values()))
    cfg = first.config
    factors: dict[str, PeftFactors] = {n: _combined_peft(a) for n, a in adapters.items()}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, f in factors.items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = f.A.contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = f.B.contiguous().cpu()
        if f.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = f.magnitude.contiguous().cpu()
        ranks[name], alphas[name] = f.rank, f.alpha
    to_save = list(dict.fromkeys(m for a in _stack(first) for m in a.config.modules_to_save))  # every stage's
    for name, t in _saved_modules(model, to_save).items():
        tensors[f"base_model.model.{name}"] = t
    # The most common rank/alpha become the defaults; the rest go to the patterns (keys are module names).
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    rank_pattern = {n: r for n, r in ranks.items() if r != r0}
    alpha_pattern = {n: a for n, a in alphas.items() if a != a0}
    rslora = {f.rslora for f in factors.values()}
    if len(rslora) != 1:
        raise ValueError("cannot export a mix of rsLoRA and plain-scaled modules in one PEFT config")
    leafs = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    layers = sorted({layer_index(n) for n in adapters if layer_index(n) is not None})
    num_layers = len(decoder_layers(model))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": cfg.dropout,
        "target_modules": leafs,
        "use_rslora": rslora.pop(),
        "use_dora": any(f.magnitude is not None for f in factors.values()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": layers if len(layers) < num_layers else None,
        "layers_pattern": "layers" if len(layers) < num_layers else None,
        "modules_to_save": to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(tensors, str(out / PEFT_WEIGHTS))
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if metadata:
        (out / "slimtune.json").write_text(json.dumps(metadata, indent=2))
    return out
