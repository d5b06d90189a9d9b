"""Training-time memory of a LoRAM recipe: the peak is the PRUNED model's (DESIGN §2 LoRAM, §4).

`slimtune.bench.estimate.estimate` models a decoder whose layers all have one geometry. A LoRAM-pruned model has two:
the `keep_first` + `keep_last` intact layers, and the pruned layers in between, each keeping
n − ⌊ratio·n⌋ (≥ 1) KV-head groups (with their G query heads each) and MLP neurons — the rounding of
`slimtune.loram.prune` (`_n_keep`), so the shapes here are exactly the ones `prune_model` produces.

`estimate_loram` estimates the two groups separately (the same estimator, on a config of the intact layers and one of
the pruned layers, `pruned_estimate_config`) and adds them up component by component, counting once what the model
has once: embeddings/lm_head, the final norm, the loss/logits, the CUDA context, RoPE's cos/sin and the final-norm
activation, 8-bit optimizer maps. What autograd keeps is summed over layers without checkpointing; with
checkpointing every layer's input is summed and the recomputed layer is the heavier group's (offload: two layer
inputs on the GPU). The result is an `Estimate` (`LoramEstimate`) whose `advice()` re-estimates the pruned model.

Approximation: each group's first adapted layer is treated as the model's first (its input norm keeps nothing),
so the pruned group is under-counted by what its first input RMSNorm keeps (a few bytes per token) when
keep_first > 0, and likewise the trailing intact layers when they follow adapted pruned layers.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimtune.bench.estimate import Estimate, adapted_layers, estimate
from slimtune.errors import SlimtuneError
from slimtune.loram.prune import _n_keep

__all__ = ["LoramEstimate", "estimate_loram", "intact_estimate_config", "pruned_estimate_config", "pruned_layout"]


def _layers(config) -> int:
    return int(config.num_hidden_layers)


def pruned_layout(config, ratio: float, keep_first: int = 0, keep_last: int = 0) -> dict[str, int]:
    """Kept units per pruned layer and how many layers are pruned, with prune.py's rounding."""
    heads, kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    L = _layers(config)
    if not 0.0 <= ratio < 1.0:
        raise SlimtuneError(f"loram.ratio: must be in [0, 1), got {ratio}")
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last > L:
        raise SlimtuneError(f"loram.keep_first + keep_last = {keep_first + keep_last}: the model has {L} layers")
    kv_keep = _n_keep(kv, ratio)
    return {
        "pruned_layers": L - keep_first - keep_last,
        "intact_layers": keep_first + keep_last,
        "num_key_value_heads": kv_keep,
        "num_attention_heads": kv_keep * (heads // kv),
        "intermediate_size": _n_keep(int(config.intermediate_size), ratio),
    }


def _with(config, **values):
    cfg = copy.deepcopy(config)
    if "head_dim" not in values:  # keep head_dim fixed when the head count changes (it defaults to hidden // heads)
        values["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def pruned_estimate_config(config, ratio: float, keep_first: int = 0, keep_last: int = 0):
    """A copy of `config` describing the pruned layers only: their KV heads, query heads (G per kept KV head),
    intermediate size, head_dim unchanged, num_hidden_layers = L − keep_first − keep_last."""
    lay = pruned_layout(config, ratio, keep_first, keep_last)
    return _with(config, num_hidden_layers=lay["pruned_layers"], num_key_value_heads=lay["num_key_value_heads"],
                 num_attention_heads=lay["num_attention_heads"], intermediate_size=lay["intermediate_size"])


def intact_estimate_config(config, keep_first: int = 0, keep_last: int = 0):
    """A copy of `config` describing the keep_first + keep_last intact layers only."""
    return _with(config, num_hidden_layers=keep_first + keep_last)


@dataclass
class LoramEstimate(Estimate):
    """An `Estimate` of a LoRAM-pruned model; `loram` holds ratio, keep_first, keep_last and the layout."""

    loram: dict[str, Any] = field(default_factory=dict)
    original_config: Any = field(default=None, repr=False, compare=False)

    def reestimate(self, **changes: Any) -> Estimate:
        """The same LoRAM estimate with some inputs changed (what `advice` compares)."""
        return estimate_loram(self.original_config, ratio=self.loram["ratio"], keep_first=self.loram["keep_first"],
                              keep_last=self.loram["keep_last"], **{**self.inputs, **changes})


def _split_layers(L: int, keep_first: int, keep_last: int, layers: Any) -> tuple[list[int], list[int]]:
    """The recipe's adapter layer selection (original indices) as (intact-group indices, pruned-group indices)."""
    chosen = adapted_layers(L, layers)
    intact, pruned = [], []
    for i in chosen:
        if i < keep_first:
            intact.append(i)
        elif i >= L - keep_last:
            intact.append(keep_first + i - (L - keep_last))
        else:
            pruned.append(i - keep_first)
    return intact, pruned


def estimate_loram(config, *, ratio: float, keep_first: int = 0, keep_last: int = 0, **kwargs: Any) -> Estimate:
    """Peak memory of one (Q)LoRA training step on the LoRAM-pruned `config` (keyword arguments as `estimate`).

    `config` is the ORIGINAL model's config (or anything `estimate` resolves). Returns a `LoramEstimate`."""
    if isinstance(config, str) or hasattr(config, "__fspath__"):
        from slimtune.bench.configs import resolve_model_config

        config = resolve_model_config(config)
    kwargs = {k: v for k, v in kwargs.items() if k != "config"}
    L = _layers(config)
    lay = pruned_layout(config, ratio, keep_first, keep_last)
    layers = kwargs.pop("layers", None)
    intact_layers, pruned_layers = _split_layers(L, keep_first, keep_last, layers)
    explicit = kwargs.pop("adapter_params", None)
    notes = [f"LoRAM: {lay['pruned_layers']} pruned layers keep {lay['num_key_value_heads']}/"
             f"{config.num_key_value_heads} KV heads and {lay['intermediate_size']}/{config.intermediate_size} MLP "
             f"neurons (ratio {ratio}); {lay['intact_layers']} layers intact"]
    if explicit is not None:
        notes.append("adapter parameter count given explicitly: counted once, as for the unpruned model (an upper "
                     "bound)")

    parts: list[Estimate] = []
    if lay["intact_layers"]:
        parts.append(estimate(intact_estimate_config(config, keep_first, keep_last), layers=intact_layers,
                              adapter_params=explicit, **kwargs))
    if lay["pruned_layers"]:
        parts.append(estimate(pruned_estimate_config(config, ratio, keep_first, keep_last), layers=pruned_layers,
                              adapter_params=0 if (explicit is not None and parts) else explicit, **kwargs))
    head = parts[0]
    tokens = head.tokens
    inp = dict(head.inputs)
    inp["layers"] = layers
    inp["adapter_params"] = explicit
    d = 2 if inp["compute_dtype"] in ("bfloat16", "float16") else 4
    hidden = int(config.hidden_size)
    final_norm = hidden * d
    per_token_once = 2 * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads) * d  # rope
    per_token_once += (hidden * d + 4) if inp["fused"] else (hidden * 4 + 4)  # final norm's saved input

    def tot(attr: str) -> int:
        return sum(getattr(p, attr) for p in parts)

    n = len(parts)
    ckpt = inp["grad_checkpointing"]
    layer_inputs = max(p.layer_input_bytes for p in parts) if ckpt == "offload" else tot("layer_input_bytes")
    if ckpt == "none":
        activations = tot("activation_bytes") - (n - 1) * per_token_once * tokens
    else:
        activations = max(p.activation_bytes for p in parts)
    optimizer = tot("optimizer_bytes")
    if inp["optimizer"] != "adamw" and n > 1 and all(p.adapter_params for p in parts):
        optimizer -= (n - 1) * 2 * 256 * 4  # the shared 8-bit quantization maps, once
    fields = dict(
        num_params=tot("num_params") - (n - 1) * (head.weights_embed_bytes // d + hidden),
        adapter_params=tot("adapter_params"),
        adapter_frozen_params=tot("adapter_frozen_params"),
        weights_linear_bytes=tot("weights_linear_bytes"),
        weights_embed_bytes=head.weights_embed_bytes,
        weights_other_bytes=tot("weights_other_bytes") - (n - 1) * final_norm,
        adapter_param_bytes=tot("adapter_param_bytes"),
        adapter_grad_bytes=tot("adapter_grad_bytes"),
        optimizer_bytes=optimizer,
        layer_input_bytes=layer_inputs,
        activation_bytes=activations,
        logits_bytes=head.logits_bytes,
        dequant_bytes=max(p.dequant_bytes for p in parts),
        cuda_context_bytes=head.cuda_context_bytes,
        cpu_offload_bytes=tot("cpu_offload_bytes"),
    )
    logits_per_token = head.bytes_per_token - (head.layer_input_bytes + head.activation_bytes) // tokens
    bytes_per_token = (layer_inputs + activations) // tokens + logits_per_token
    total = sum(v for k, v in fields.items() if k.endswith("_bytes") and k != "cpu_offload_bytes")
    base = {f.name: getattr(head, f.name) for f in dataclasses.fields(Estimate)}
    base.update(fields, inputs=inp, bytes_per_token=bytes_per_token, fixed_bytes=total - bytes_per_token * tokens,
                notes=notes + [x for p in parts for x in p.notes if x not in notes], config=config,
                activation_per_token_per_layer=parts[-1].activation_per_token_per_layer)
    return LoramEstimate(**base, loram={"ratio": ratio, "keep_first": keep_first, "keep_last": keep_last, **lay},
                         original_config=config)


def recipe_loram_layout(recipe: Any) -> dict[str, Any] | None:
    """{ratio, keep_first, keep_last} when a recipe trains on a LoRAM-pruned model — it has a ``loram`` block, or its
    ``model.name`` is a pruned folder (loram.json: the map's own settings) — else None."""
    lc = getattr(recipe, "loram", None)
    if lc is not None:
        return {"ratio": float(lc.ratio), "keep_first": lc.keep_first, "keep_last": lc.keep_last}
    from pathlib import Path

    from slimtune.loram.prune import KEPT_FILE, KeptIndex
    from slimtune.models.load import resolve_package_path

    path = Path(resolve_package_path(recipe.model.name))
    if (path / KEPT_FILE).is_file():
        kept = KeptIndex.load(path)
        return {"ratio": kept.ratio, "keep_first": kept.keep_first, "keep_last": kept.keep_last}
    return None
