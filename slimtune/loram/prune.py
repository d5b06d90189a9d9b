"""LoRAM step 1: structured pruning of a decoder-only base of any registered family (DESIGN §2, LoRAM).

Which rows/columns of which module a unit owns comes from the family's ``ArchSpec`` (``slimtune.models.arch``): each
projection's role(s) and pruned dimension, packed splits (a packed module's parts are pruned part by part), biases.

What is pruned, per decoder layer in [keep_first, L - keep_last):

- MLP intermediate neurons. Neuron j is row j of gate_proj and up_proj (and their biases) and column j of down_proj.
- Attention KV-head groups. Group g is KV head g together with its G = num_attention_heads / num_key_value_heads query
  heads g*G … g*G+G-1 (the heads that `repeat_kv` maps onto it): rows g*d … g*d+d-1 of k_proj and v_proj (d =
  head_dim), the rows of those query heads in q_proj, and the same columns of o_proj (plus q/k/v biases). Removing
  whole groups keeps G, head_dim and the softmax scaling unchanged, so attention code needs no patching.

How many: a layer with n units (n KV groups, or n neurons) loses ⌊ratio · n⌋ of them, clamped so at least one
remains. Flooring is the LoRAM convention: at ratio 0.85 a 70B layer keeps 2 of 8 KV groups and 4,301 of 28,672
neurons, which reproduces the paper's 15.81× (see `parameter_reduction`).

Which (`method`):

- "magnitude" (data-free weight-magnitude importance), computed in float32 over every weight the unit owns:
      score(group g)  = sqrt( Σ‖q_proj rows of g's query heads‖² + Σ‖k_proj rows of g‖² + Σ‖v_proj rows of g‖²
                              + Σ‖o_proj columns of g's query heads‖² + Σ (q/k/v bias entries of g)² )
      score(neuron j) = sqrt( ‖gate_proj[j, :]‖² + ‖up_proj[j, :]‖² + ‖down_proj[:, j]‖² + gate_bias[j]² + up_bias[j]² )
  the units with the highest scores are kept (ties: lower index first). The paper's "Stru" variant uses LLM-Pruner's
  gradient (Taylor) importance, which needs data; this score is the data-free stand-in.
- "random": a seeded uniform choice (torch.Generator(seed)); per pruned layer, in layer order, one permutation of
  the KV groups, then one of the neurons.

Kept indices are stored in ascending order, so the pruned matrices keep the original relative order of rows/columns.

File format. transformers' configs hold one intermediate_size and one head count for every layer, so a
pruned model with full-size first/last layers cannot be described by config.json alone. A pruned folder therefore
holds: config.json = the ORIGINAL config (so `AutoModelForCausalLM.from_pretrained` on it fails loudly on shape
mismatches instead of silently doing the wrong thing), safetensors weights with the pruned shapes, and `loram.json`
(the kept-index map; see `KeptIndex.to_dict`). `load_pruned` builds the original architecture with parameters on the
meta device, swaps the pruned layers' q/k/v/o/gate/up/down nn.Linear modules for ones with the kept shapes, and
assigns the stored tensors. In transformers 5.x the attention modules reshape with (…, -1, head_dim) and use
only head_dim, num_key_value_groups and scaling (a family whose attention reads head counts from the config says so
in its spec's ``loram_prunable``), none of which change, so the stock forward, backward and generate
(DynamicCache, which sizes itself per layer) work. A static KV cache (cache_implementation="static") is sized from
the config and is not supported on a pruned model.

Memory. `prune_model` works layer by layer in place: each projection is replaced by a new nn.Linear holding
index_select-ed weights, and the old tensor is freed as soon as its module is dropped; scores are computed in row/column
chunks, so the peak overhead is one layer's pruned copies plus a bounded float32 scratch. It also works on a model
built on the meta device (method="random" only: magnitude needs values), which is how the 70B closed form is checked
without allocating anything. `prune_checkpoint` prunes a safetensors checkpoint folder without ever building the
model: it reads one layer's tensors at a time and writes one shard per layer.

Prune before quantizing: QLoRAM loads the pruned bf16 folder and quantizes it to NF4 like any other base.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from slimtune.errors import ModelError, SlimtuneError
from slimtune.models.arch import ArchSpec
from slimtune.models.pruned import (
    KEPT_FILE,
    Geometry,
    KeptIndex,
    LayerKept,
    _cfg_get,
    _decoder_layers,
    _install_layer,
    _layer_tensors,
    _slice_layer,
    _weight_files,
    family_spec,
    load_pruned,
    save_pruned,
)

__all__ = [
    "Geometry",
    "KeptIndex",
    "LayerKept",
    "load_pruned",
    "parameter_reduction",
    "prune_checkpoint",
    "prune_model",
    "save_pruned",
    "validate_prune_args",
]


_NF4_BYTES_PER_PARAM = 0.516  # NF4 + double quant, DESIGN §4
_CHUNK = 4096  # rows/columns per float32 scratch block when scoring


# --------------------------------------------------------------------------------------------------- geometry / map


# --------------------------------------------------------------------------------------------------- selection


def _n_keep(n: int, ratio: float) -> int:
    """Units kept out of n: n − ⌊ratio·n⌋ (the epsilon absorbs float noise such as 0.29·100 = 28.999…), ≥ 1."""
    removed = math.floor(ratio * n + 1e-9)
    return max(1, n - removed)


def _sq_norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared L2 norms of the rows (dim=0 → one per row) or columns (dim=1 → one per column) of a 2-D weight, in
    float32, in blocks of _CHUNK so the float32 scratch stays bounded."""
    if w.device.type == "meta":
        raise ModelError("LoRAM prune: method='magnitude' needs real weights (the model is on the meta device)")
    n = w.shape[dim]
    out = torch.empty(n, dtype=torch.float32, device=w.device)
    for s in range(0, n, _CHUNK):
        blk = w.narrow(dim, s, min(_CHUNK, n - s)).float()
        out[s : s + blk.shape[dim]] = blk.pow(2).sum(1 - dim)
    return out


def _role_norms(t: Mapping[str, torch.Tensor], geo: Geometry, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """Squared norms per channel of every role along its pruned dimension: q/k/v/gate/up rows (+ bias entries),
    o/down columns; a packed module is split into its parts first."""
    g = geo.arch(spec)
    out: dict[str, torch.Tensor] = {}
    for p in spec.projections:
        key = spec.block_of(p.name)
        if p.prune == "out":
            acc = _sq_norms(t[f"{key}.weight"], 0)
            b = t.get(f"{key}.bias")
            if b is not None:
                acc += b.float().pow(2)
            sizes = [g.role_out(r) for r in p.parts]
        else:  # an output-side bias is not pruned and does not score
            acc = _sq_norms(t[f"{key}.weight"], 1)
            sizes = [g.role_in(r) for r in p.parts]
        out.update(zip(p.parts, acc.split(sizes)))
    return out


def _magnitude_scores(
    t: Mapping[str, torch.Tensor], geo: Geometry, spec: ArchSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per KV group, score per neuron); see the module docstring for the formula."""
    d, g = geo.head_dim, geo.group
    n = _role_norms(t, geo, spec)
    per_q_head = (n["q"] + n["o"]).view(geo.num_heads, d).sum(1)  # (num_heads,)
    per_group = per_q_head.view(geo.num_kv_heads, g).sum(1) + (n["k"] + n["v"]).view(geo.num_kv_heads, d).sum(1)
    neuron = n["gate"] + n["up"] + n["down"]
    return per_group.sqrt(), neuron.sqrt()


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def _choose_layer(
    t: Mapping[str, torch.Tensor], geo: Geometry, ratio: float, method: str, gen: torch.Generator | None,
    spec: ArchSpec,
) -> LayerKept:
    k_kv, k_n = _n_keep(geo.num_kv_heads, ratio), _n_keep(geo.intermediate_size, ratio)
    if method == "magnitude":
        s_kv, s_n = _magnitude_scores(t, geo, spec)
        return LayerKept(_top(s_kv, k_kv), _top(s_n, k_n))
    kv = sorted(torch.randperm(geo.num_kv_heads, generator=gen)[:k_kv].tolist())
    neurons = sorted(torch.randperm(geo.intermediate_size, generator=gen)[:k_n].tolist())
    return LayerKept(kv, neurons)


def _check_layer_tensors(t: Mapping[str, torch.Tensor], geo: Geometry, where: str, spec: ArchSpec) -> None:
    for proj, shape in spec.shapes(geo.arch(spec)).items():
        name = f"{spec.block_of(proj)}.weight"
        if name not in t:
            raise ModelError(f"LoRAM prune: {where}.{name} not found (not a {spec.name} decoder layer)")
        if tuple(t[name].shape) != shape:
            raise ModelError(f"LoRAM prune: {where}.{name} has shape {tuple(t[name].shape)}, expected {shape}")


# --------------------------------------------------------------------------------------------------- in-memory model


def validate_prune_args(ratio: float, method: str, keep_first: int, keep_last: int, num_layers: int | None = None
                        ) -> None:
    """The one check of LoRAM's prune arguments (ratio, method, keep_first/keep_last against the layer count; without
    ``num_layers``, before the model's config is read, all but the layer count)."""
    if not (0.0 <= float(ratio) < 1.0):
        raise SlimtuneError(f"LoRAM prune: ratio must be in [0, 1), got {ratio}")
    if method not in ("magnitude", "random"):
        raise SlimtuneError(f"LoRAM prune: method must be 'magnitude' or 'random', got {method!r}")
    if keep_first < 0 or keep_last < 0:
        raise SlimtuneError(f"LoRAM prune: keep_first/keep_last must be ≥ 0, got {keep_first}/{keep_last}")
    if num_layers is not None and keep_first + keep_last > num_layers:
        raise SlimtuneError(
            f"LoRAM prune: keep_first + keep_last = {keep_first + keep_last} exceeds the model's {num_layers} layers"
        )


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    return json.loads(config.to_json_string(use_diff=False))


@torch.no_grad()
def prune_model(
    model: nn.Module,
    *,
    ratio: float,
    method: str = "magnitude",
    keep_first: int = 0,
    keep_last: int = 0,
    seed: int = 0,
) -> tuple[nn.Module, KeptIndex]:
    """Prune `model` (an HF causal LM of a registered family, plain nn.Linear projections) in place, layer by layer.

    Layers keep_first … L−keep_last−1 lose ⌊ratio·n⌋ of their KV-head groups and MLP neurons (≥ 1 of each kept),
    chosen by `method` ("magnitude" or seeded "random"). Returns the same model object (now pruned) and its map.
    """
    spec = family_spec(model.config)
    geo = Geometry.from_config(model.config)
    layers = _decoder_layers(model, spec)
    if len(layers) != geo.num_layers:
        raise ModelError(f"LoRAM prune: config says {geo.num_layers} layers, the model has {len(layers)}")
    validate_prune_args(ratio, method, keep_first, keep_last, geo.num_layers)
    gen = torch.Generator().manual_seed(int(seed)) if method == "random" else None
    kept = KeptIndex(
        geometry=geo,
        layers={},
        ratio=float(ratio),
        method=method,
        seed=int(seed) if method == "random" else None,
        keep_first=keep_first,
        keep_last=keep_last,
        base_model_name_or_path=getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        or None,
        original_config=_config_dict(model.config),
    )
    for i in range(keep_first, geo.num_layers - keep_last):
        where = f"model.layers.{i}"
        t = _layer_tensors(layers[i], where, spec)
        _check_layer_tensors(t, geo, where, spec)
        kept.layers[i] = _choose_layer(t, geo, ratio, method, gen, spec)
        new = _slice_layer(t, kept, i)
        del t  # the old tensors die with their modules in _install_layer
        _install_layer(layers[i], kept, i, new)
    return model, kept


# --------------------------------------------------------------------------------------------------- save / load


# --------------------------------------------------------------------------------------------------- streaming


_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?layers)\.(?P<i>\d+)\.(?P<rest>.+)$")


@torch.no_grad()
def prune_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ratio: float,
    method: str = "magnitude",
    keep_first: int = 0,
    keep_last: int = 0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> KeptIndex:
    """Prune an HF safetensors checkpoint folder without building the model: one layer's tensors are read, scored,
    sliced and written (one shard per layer) at a time. Non-weight files (config, tokenizer, generation config) are
    copied. The result loads with `load_pruned(out_dir)` and equals `prune_model` on the loaded model."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    src, out = Path(src), Path(out_dir)
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{src}/config.json: cannot load ({err})") from err
    spec = family_spec(config)
    geo = Geometry.from_config(config)
    validate_prune_args(ratio, method, keep_first, keep_last, geo.num_layers)
    files = _weight_files(src)
    where_is = {k: fname for fname, keys in files.items() for k in keys}
    by_layer: dict[int, list[str]] = {}
    other: list[str] = []
    prefix = None
    for key in where_is:
        m = _LAYER_KEY.match(key)
        if m:
            by_layer.setdefault(int(m["i"]), []).append(key)
            prefix = m["pre"]
        else:
            other.append(key)
    if sorted(by_layer) != list(range(geo.num_layers)):
        raise ModelError(f"{src}: checkpoint has layers {sorted(by_layer)[:5]}…, config says {geo.num_layers}")

    def read(keys: Iterable[str]) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        for fname in sorted({where_is[k] for k in keys}):
            with safe_open(str(src / fname), "pt") as f:
                for k in keys:
                    if where_is[k] == fname:
                        t = f.get_tensor(k)
                        got[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return got

    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
            if item.name != KEPT_FILE:
                shutil.copy2(item, out / item.name)

    gen = torch.Generator().manual_seed(int(seed)) if method == "random" else None
    kept = KeptIndex(
        geometry=geo,
        layers={},
        ratio=float(ratio),
        method=method,
        seed=int(seed) if method == "random" else None,
        keep_first=keep_first,
        keep_last=keep_last,
        base_model_name_or_path=str(src),
        original_config=_config_dict(config),
    )
    weight_map: dict[str, str] = {}
    total = 0
    shards = [("model-other.safetensors", other)] + [
        (f"model-layer-{i:05d}.safetensors", by_layer[i]) for i in range(geo.num_layers)
    ]
    for n, (fname, keys) in enumerate(shards):
        tensors = read(keys)
        i = n - 1
        if keep_first <= i < geo.num_layers - keep_last:
            head = f"{prefix}.{i}."
            rel = {k[len(head):]: v for k, v in tensors.items()}
            _check_layer_tensors(rel, geo, f"{prefix}.{i}", spec)
            kept.layers[i] = _choose_layer(rel, geo, ratio, method, gen, spec)
            for name, t in _slice_layer(rel, kept, i).items():
                tensors[head + name] = t
            del rel
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    kept.save(out / KEPT_FILE)
    return kept


# --------------------------------------------------------------------------------------------------- closed form


def _count(config: Any, kept: KeptIndex | None) -> dict[str, int]:
    """Closed-form parameter counts of the original (kept=None) or pruned model: linear weights, everything else
    (shapes, biases and norms from the family's ArchSpec)."""
    spec = family_spec(config)
    geo = Geometry.from_config(config)
    h, g = geo.hidden_size, geo.group
    vocab = int(_cfg_get(config)("vocab_size"))
    bias = spec.bias_map(config)
    linear = 0
    other = vocab * h * (1 if spec.tied(config) else 2) + h  # embeddings (+ lm_head unless tied) + final norm
    for i in range(geo.num_layers):
        lk = kept.layers.get(i) if kept is not None else None
        n_kv = len(lk.kv_heads) if lk else geo.num_kv_heads
        n_i = len(lk.neurons) if lk else geo.intermediate_size
        lg = geo.arch(spec, kv_heads=n_kv, heads=n_kv * g, intermediate=n_i)
        shapes = spec.shapes(lg)
        linear += sum(o * i_ for o, i_ in shapes.values())
        other += spec.norm_params_per_layer(lg) + sum(shapes[p][0] for p in shapes if bias[p])
    return {"linear": linear, "other": other, "total": linear + other}


def parameter_reduction(orig_config: Any, kept: KeptIndex, *, quant_bits: int | None = None) -> dict[str, Any]:
    """Closed-form parameter counts of the original and pruned model, and the reduction factors.

    Returns original_params, pruned_params and param_reduction = original / pruned (what LoRAM alone saves).
    With quant_bits (4 for QLoRAM) it adds:
      - paper_reduction = (original · 16) / (pruned · quant_bits): every parameter of the pruned model counted at
        quant_bits against a 16-bit original. This is the LoRAM paper's convention; with ⌊ratio·n⌋ units removed it
        gives 15.81× for LLaMA-3.1-70B (16.95× for LLaMA-2-70B) at ratio 0.85, keep 4 first / 2 last.
      - memory_reduction = original bf16 bytes / pruned bytes, where the pruned linear weights (q/k/v/o/gate/up/down)
        cost 0.516 B/param for 4-bit (NF4 + double quant, DESIGN §4; quant_bits/8 otherwise) and embeddings,
        lm_head, norms and biases stay bf16 — the figure a bitsandbytes QLoRAM run actually sees (≈ 11.4× for 70B).
    `orig_config` is an HF config or its dict; only the layer geometry must match the map (so a LLaMA-2-70B config
    can be paired with a map made on LLaMA-3.1-70B, which has the same layers).
    """
    geo = Geometry.from_config(orig_config)
    if geo != kept.geometry:
        raise ModelError(
            f"parameter_reduction: config geometry {geo} does not match the kept-index map's {kept.geometry}"
        )
    orig, pruned = _count(orig_config, None), _count(orig_config, kept)
    out: dict[str, Any] = {
        "original_params": orig["total"],
        "pruned_params": pruned["total"],
        "original_linear_params": orig["linear"],
        "pruned_linear_params": pruned["linear"],
        "other_params": pruned["other"],
        "param_reduction": orig["total"] / pruned["total"],
    }
    if quant_bits is not None:
        if quant_bits not in (2, 3, 4, 8, 16):
            raise SlimtuneError(f"parameter_reduction: quant_bits must be one of 2, 3, 4, 8, 16, got {quant_bits}")
        per_linear = _NF4_BYTES_PER_PARAM if quant_bits == 4 else quant_bits / 8
        orig_bytes = 2 * orig["total"]
        pruned_bytes = per_linear * pruned["linear"] + 2 * pruned["other"]
        out |= {
            "quant_bits": quant_bits,
            "paper_reduction": (16 * orig["total"]) / (quant_bits * pruned["total"]),
            "original_bytes_bf16": orig_bytes,
            "pruned_bytes": pruned_bytes,
            "linear_bytes_per_param": per_linear,
            "memory_reduction": orig_bytes / pruned_bytes,
        }
    return out
