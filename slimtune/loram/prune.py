"""LoRAM step 1: structured pruning of a Llama/Qwen2-family base (DESIGN §2, LoRAM).

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

File format. transformers' Llama/Qwen2 configs hold one intermediate_size and one head count for every layer, so a
pruned model with full-size first/last layers cannot be described by config.json alone. A pruned folder therefore
holds: config.json = the ORIGINAL config (so `AutoModelForCausalLM.from_pretrained` on it fails loudly on shape
mismatches instead of silently doing the wrong thing), safetensors weights with the pruned shapes, and `loram.json`
(the kept-index map; see `KeptIndex.to_dict`). `load_pruned` builds the original architecture with parameters on the
meta device, swaps the pruned layers' q/k/v/o/gate/up/down nn.Linear modules for ones with the kept shapes, and
assigns the stored tensors. In transformers 5.x LlamaAttention/Qwen2Attention reshape with (…, -1, head_dim) and use
only head_dim, num_key_value_groups and scaling, none of which change, so the stock forward, backward and generate
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from slimtune.errors import ModelError, SlimtuneError

__all__ = [
    "ATTN_PROJ",
    "MLP_PROJ",
    "PRUNED_DIM",
    "Geometry",
    "KeptIndex",
    "LayerKept",
    "load_pruned",
    "parameter_reduction",
    "prune_checkpoint",
    "prune_model",
    "save_pruned",
]

KEPT_FILE = "loram.json"
FORMAT = "slimtune.loram.kept/1"

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Which dimension of each projection's weight (out, in) pruning shrinks: "out" = rows, "in" = columns.
PRUNED_DIM = {
    "q_proj": "out",
    "k_proj": "out",
    "v_proj": "out",
    "o_proj": "in",
    "gate_proj": "out",
    "up_proj": "out",
    "down_proj": "in",
}
_BLOCK = {p: "self_attn" for p in ATTN_PROJ} | {p: "mlp" for p in MLP_PROJ}
_NF4_BYTES_PER_PARAM = 0.516  # NF4 + double quant, DESIGN §4
_CHUNK = 4096  # rows/columns per float32 scratch block when scoring


# --------------------------------------------------------------------------------------------------- geometry / map


@dataclass(frozen=True)
class Geometry:
    """The shapes pruning reasons about, read from an HF config."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "Geometry":
        c = _cfg_get(config)
        try:
            hidden = int(c("hidden_size"))
            heads = int(c("num_attention_heads"))
            kv = int(c("num_key_value_heads") or heads)
            head_dim = c("head_dim") or hidden // heads
            geo = cls(hidden, int(c("num_hidden_layers")), heads, kv, int(head_dim), int(c("intermediate_size")))
        except (TypeError, ValueError, KeyError) as err:
            raise ModelError(f"LoRAM prune: config lacks a Llama-style geometry ({err})") from err
        if heads % kv:
            raise ModelError(f"LoRAM prune: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return geo

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class LayerKept:
    """Kept units of one pruned layer, ascending: KV-head indices and MLP intermediate-neuron indices."""

    kv_heads: list[int]
    neurons: list[int]


@dataclass
class KeptIndex:
    """The kept-index map of a pruned model: which units of which layers survived, plus how they were chosen.

    `layers` holds only the pruned layers (keep_first ≤ i < L − keep_last); a layer absent from it is intact.
    Channel indices follow from the units: KV head h owns channels h*d … h*d+d−1 of k/v_proj rows; query head q
    owns channels q*d … q*d+d−1 of q_proj rows and o_proj columns; the query heads of KV head h are h*G … h*G+G−1.
    """

    geometry: Geometry
    layers: dict[int, LayerKept]
    ratio: float
    method: str
    seed: int | None
    keep_first: int
    keep_last: int
    base_model_name_or_path: str | None = None
    original_config: dict = field(default_factory=dict)

    # ---- derived indices
    def q_heads(self, layer: int) -> list[int]:
        """Kept query heads of a pruned layer: exactly the G heads of each kept KV head, ascending."""
        g = self.geometry.group
        return [h * g + j for h in self.layers[layer].kv_heads for j in range(g)]

    def channels(self, layer: int, proj: str) -> torch.Tensor | None:
        """Kept indices along the pruned dimension of `proj` (rows for q/k/v/gate/up, columns for o/down), as an
        int64 tensor in ascending order; None when the layer is not pruned."""
        if layer not in self.layers:
            return None
        d = self.geometry.head_dim
        if proj in ("q_proj", "o_proj"):
            heads = self.q_heads(layer)
        elif proj in ("k_proj", "v_proj"):
            heads = self.layers[layer].kv_heads
        elif proj in MLP_PROJ:
            return torch.tensor(self.layers[layer].neurons, dtype=torch.long)
        else:
            raise KeyError(proj)
        return (torch.tensor(heads, dtype=torch.long)[:, None] * d + torch.arange(d)).reshape(-1)

    def original_size(self, proj: str) -> int:
        """Size of `proj`'s pruned dimension in the original model."""
        geo = self.geometry
        return {
            "q_proj": geo.num_heads * geo.head_dim,
            "o_proj": geo.num_heads * geo.head_dim,
            "k_proj": geo.num_kv_heads * geo.head_dim,
            "v_proj": geo.num_kv_heads * geo.head_dim,
        }.get(proj, geo.intermediate_size)

    # ---- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "ratio": self.ratio,
            "seed": self.seed,
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
            "base_model_name_or_path": self.base_model_name_or_path,
            "geometry": self.geometry.as_dict(),
            "channel_rule": (
                "kv head h -> k/v_proj rows [h*head_dim, (h+1)*head_dim); query heads of kv head h -> "
                "[h*G, (h+1)*G), G = num_heads/num_kv_heads; query head q -> q_proj rows and o_proj columns "
                "[q*head_dim, (q+1)*head_dim); neuron j -> gate/up_proj row j, down_proj column j"
            ),
            "layers": {
                str(i): {"kv_heads": lk.kv_heads, "q_heads": self.q_heads(i), "neurons": lk.neurons}
                for i, lk in sorted(self.layers.items())
            },
            "original_config": self.original_config,
        }

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = KEPT_FILE) -> "KeptIndex":
        if data.get("format") != FORMAT:
            raise ModelError(f"{where}: not a slimtune LoRAM kept-index map (format {data.get('format')!r})")
        try:
            geo = Geometry(**data["geometry"])
            layers = {
                int(i): LayerKept([int(h) for h in v["kv_heads"]], [int(n) for n in v["neurons"]])
                for i, v in data["layers"].items()
            }
            kept = cls(
                geometry=geo,
                layers=layers,
                ratio=float(data["ratio"]),
                method=str(data["method"]),
                seed=data.get("seed"),
                keep_first=int(data["keep_first"]),
                keep_last=int(data["keep_last"]),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                original_config=dict(data.get("original_config") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{where}: malformed kept-index map ({err!r})") from err
        for i, lk in layers.items():
            ok = (
                0 <= i < geo.num_layers
                and lk.kv_heads == sorted(set(lk.kv_heads))
                and lk.neurons == sorted(set(lk.neurons))
                and 0 < len(lk.kv_heads) and all(0 <= h < geo.num_kv_heads for h in lk.kv_heads)
                and 0 < len(lk.neurons) and all(0 <= n < geo.intermediate_size for n in lk.neurons)
            )
            if not ok:
                raise ModelError(f"{where}: layers.{i} has out-of-range, unsorted or empty kept indices")
        return kept

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as JSON (to `path`, or to `path`/loram.json when `path` is a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / KEPT_FILE
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KeptIndex":
        """Read a map from a loram.json file or from a pruned-model folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / KEPT_FILE
        if not path.is_file():
            raise ModelError(f"{path}: no LoRAM kept-index map (expected {KEPT_FILE} written by save_pruned)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ModelError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
        return cls.from_dict(data, where=str(path))


# --------------------------------------------------------------------------------------------------- selection


def _cfg_get(config: Any):
    if isinstance(config, Mapping):
        return lambda k: config.get(k)
    return lambda k: getattr(config, k, None)


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


def _magnitude_scores(t: Mapping[str, torch.Tensor], geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per KV group, score per neuron); see the module docstring for the formula."""
    d, g = geo.head_dim, geo.group

    def get(name):
        return t.get(name)

    q_rows = _sq_norms(t["self_attn.q_proj.weight"], 0)
    o_cols = _sq_norms(t["self_attn.o_proj.weight"], 1)
    k_rows = _sq_norms(t["self_attn.k_proj.weight"], 0)
    v_rows = _sq_norms(t["self_attn.v_proj.weight"], 0)
    for name, acc in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
        b = get(f"self_attn.{name}.bias")
        if b is not None:
            acc += b.float().pow(2)
    per_q_head = (q_rows + o_cols).view(geo.num_heads, d).sum(1)  # (num_heads,)
    per_group = per_q_head.view(geo.num_kv_heads, g).sum(1) + (k_rows + v_rows).view(geo.num_kv_heads, d).sum(1)

    neuron = _sq_norms(t["mlp.gate_proj.weight"], 0) + _sq_norms(t["mlp.up_proj.weight"], 0)
    neuron += _sq_norms(t["mlp.down_proj.weight"], 1)
    for name in ("gate_proj", "up_proj"):
        b = get(f"mlp.{name}.bias")
        if b is not None:
            neuron += b.float().pow(2)
    return per_group.sqrt(), neuron.sqrt()


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def _choose_layer(
    t: Mapping[str, torch.Tensor], geo: Geometry, ratio: float, method: str, gen: torch.Generator | None
) -> LayerKept:
    k_kv, k_n = _n_keep(geo.num_kv_heads, ratio), _n_keep(geo.intermediate_size, ratio)
    if method == "magnitude":
        s_kv, s_n = _magnitude_scores(t, geo)
        return LayerKept(_top(s_kv, k_kv), _top(s_n, k_n))
    kv = sorted(torch.randperm(geo.num_kv_heads, generator=gen)[:k_kv].tolist())
    neurons = sorted(torch.randperm(geo.intermediate_size, generator=gen)[:k_n].tolist())
    return LayerKept(kv, neurons)


def _check_layer_tensors(t: Mapping[str, torch.Tensor], geo: Geometry, where: str) -> None:
    qd, kvd = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    want = {
        "self_attn.q_proj.weight": (qd, geo.hidden_size),
        "self_attn.k_proj.weight": (kvd, geo.hidden_size),
        "self_attn.v_proj.weight": (kvd, geo.hidden_size),
        "self_attn.o_proj.weight": (geo.hidden_size, qd),
        "mlp.gate_proj.weight": (geo.intermediate_size, geo.hidden_size),
        "mlp.up_proj.weight": (geo.intermediate_size, geo.hidden_size),
        "mlp.down_proj.weight": (geo.hidden_size, geo.intermediate_size),
    }
    for name, shape in want.items():
        if name not in t:
            raise ModelError(f"LoRAM prune: {where}.{name} not found (only Llama/Qwen2-style layers are supported)")
        if tuple(t[name].shape) != shape:
            raise ModelError(f"LoRAM prune: {where}.{name} has shape {tuple(t[name].shape)}, expected {shape}")


def _slice_layer(t: Mapping[str, torch.Tensor], kept: KeptIndex, layer: int) -> dict[str, torch.Tensor]:
    """New tensors for the layer's seven projections (weights and biases along the pruned dimension only); other
    entries of `t` are not returned. The output-side bias of o_proj/down_proj is not pruned and is returned as is."""
    out: dict[str, torch.Tensor] = {}
    for proj, dim in PRUNED_DIM.items():
        idx = kept.channels(layer, proj)
        w = t[f"{_BLOCK[proj]}.{proj}.weight"]
        idx = idx.to(w.device)
        out[f"{_BLOCK[proj]}.{proj}.weight"] = w.index_select(0 if dim == "out" else 1, idx)
        b = t.get(f"{_BLOCK[proj]}.{proj}.bias")
        if b is not None:
            out[f"{_BLOCK[proj]}.{proj}.bias"] = b.index_select(0, idx) if dim == "out" else b
    return out


# --------------------------------------------------------------------------------------------------- in-memory model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(f"LoRAM prune: {type(model).__name__} has no model.layers (Llama/Qwen2-family models only)")


def _layer_tensors(layer: nn.Module, where: str) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for proj in PRUNED_DIM:
        mod = getattr(getattr(layer, _BLOCK[proj], None), proj, None)
        if type(mod) is not nn.Linear:
            kind = type(mod).__name__
            raise ModelError(
                f"LoRAM prune: {where}.{_BLOCK[proj]}.{proj} is {kind}, expected a plain nn.Linear "
                "(prune the unquantized base before adding adapters or quantizing)"
            )
        t[f"{_BLOCK[proj]}.{proj}.weight"] = mod.weight.data
        if mod.bias is not None:
            t[f"{_BLOCK[proj]}.{proj}.bias"] = mod.bias.data
    return t


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=like.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=like.bias.requires_grad)
    lin.train(like.training)
    return lin


def _set_head_counts(layer: nn.Module, n_q: int, n_kv: int, n_neurons: int) -> None:
    """Keep the (informational) size attributes some attention/MLP classes carry in step with the new shapes.
    transformers 5.x Llama/Qwen2 forward only reads head_dim and num_key_value_groups, which pruning whole KV
    groups leaves unchanged."""
    attn, mlp = layer.self_attn, layer.mlp
    for name, value in (("num_heads", n_q), ("num_attention_heads", n_q), ("num_key_value_heads", n_kv)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = n_neurons


def _install_layer(layer: nn.Module, kept: KeptIndex, i: int, new: Mapping[str, torch.Tensor]) -> None:
    for proj in PRUNED_DIM:
        block = getattr(layer, _BLOCK[proj])
        old = getattr(block, proj)
        name = f"{_BLOCK[proj]}.{proj}"
        setattr(block, proj, _new_linear(new[f"{name}.weight"], new.get(f"{name}.bias"), old))
    lk = kept.layers[i]
    _set_head_counts(layer, len(lk.kv_heads) * kept.geometry.group, len(lk.kv_heads), len(lk.neurons))


def _validate_args(ratio: float, method: str, keep_first: int, keep_last: int, num_layers: int) -> None:
    if not (0.0 <= float(ratio) < 1.0):
        raise SlimtuneError(f"LoRAM prune: ratio must be in [0, 1), got {ratio}")
    if method not in ("magnitude", "random"):
        raise SlimtuneError(f"LoRAM prune: method must be 'magnitude' or 'random', got {method!r}")
    if keep_first < 0 or keep_last < 0:
        raise SlimtuneError(f"LoRAM prune: keep_first/keep_last must be ≥ 0, got {keep_first}/{keep_last}")
    if keep_first + keep_last > num_layers:
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
    """Prune `model` (an HF Llama/Qwen2-family causal LM with plain nn.Linear projections) in place, layer by layer.

    Layers keep_first … L−keep_last−1 lose ⌊ratio·n⌋ of their KV-head groups and MLP neurons (≥ 1 of each kept),
    chosen by `method` ("magnitude" or seeded "random"). Returns the same model object (now pruned) and its map.
    """
    geo = Geometry.from_config(model.config)
    layers = _decoder_layers(model)
    if len(layers) != geo.num_layers:
        raise ModelError(f"LoRAM prune: config says {geo.num_layers} layers, the model has {len(layers)}")
    _validate_args(ratio, method, keep_first, keep_last, geo.num_layers)
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
        t = _layer_tensors(layers[i], where)
        _check_layer_tensors(t, geo, where)
        kept.layers[i] = _choose_layer(t, geo, ratio, method, gen)
        new = _slice_layer(t, kept, i)
        del t  # the old tensors die with their modules in _install_layer
        _install_layer(layers[i], kept, i, new)
    return model, kept


# --------------------------------------------------------------------------------------------------- save / load


def save_pruned(model: nn.Module, kept: KeptIndex, out_dir: str | os.PathLike, **save_kwargs) -> Path:
    """Write a pruned model folder: config.json (the original config), safetensors weights with the pruned shapes
    (via `model.save_pretrained`), and loram.json. Extra keyword arguments go to save_pretrained."""
    out = Path(out_dir)
    if not hasattr(model, "save_pretrained") or hasattr(model, "peft_config"):
        raise ModelError("LoRAM save_pruned: expects the pruned transformers model itself (not a PEFT wrapper)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    kept.save(out / KEPT_FILE)
    return out


def _weight_files(path: Path) -> dict[str, list[str]]:
    """{safetensors file: [keys]} for a folder with model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, list[str]] = {}
        for key, fname in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(fname, []).append(key)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {"model.safetensors": list(f.keys())}
    raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_pruned(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a folder written by `save_pruned` / `prune_checkpoint` as a runnable transformers model.

    The original architecture is built with parameters on the meta device (no allocation), the pruned layers'
    projections are swapped for nn.Linear modules of the kept shapes, and the stored tensors are assigned (cast to
    `dtype` when given). `attn_implementation` ("eager", "sdpa", …) goes to the model constructor as in
    from_pretrained. The kept map is `KeptIndex.load(path)`.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    kept = KeptIndex.load(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds
        raise ModelError(f"{path}/config.json: cannot load ({err})") from err
    if Geometry.from_config(config) != kept.geometry:
        raise ModelError(f"{path}: config.json and {KEPT_FILE} describe different geometries")
    with init_empty_weights(include_buffers=False):
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_config(config, **extra)
    layers = _decoder_layers(model)
    geo = kept.geometry
    for i in kept.layers:  # meta tensors: slicing them allocates nothing, it only gives the kept shapes
        _install_layer(layers[i], kept, i, _slice_layer(_layer_tensors(layers[i], f"model.layers.{i}"), kept, i))

    state: dict[str, torch.Tensor] = {}
    for fname, keys in _weight_files(path).items():
        with safe_open(str(path / fname), "pt", device=str(device)) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    del state
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | set(
        getattr(model, "_tied_weights_keys", None) or {}
    )
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{path}: pruned weights do not match the kept-index map (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ModelError(f"{path}: weights missing for {still_meta[:3]}")
    if dtype is not None:
        model.config.dtype = dtype
    model.to(device)
    model.eval()
    # geometry sanity: every pruned layer now has the kept shapes
    for i, lk in kept.layers.items():
        attn = layers[i].self_attn
        if attn.k_proj.weight.shape[0] != len(lk.kv_heads) * geo.head_dim:
            raise ModelError(f"{path}: layer {i} k_proj does not match {KEPT_FILE}")
    return model


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
    geo = Geometry.from_config(config)
    _validate_args(ratio, method, keep_first, keep_last, geo.num_layers)
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
            _check_layer_tensors(rel, geo, f"{prefix}.{i}")
            kept.layers[i] = _choose_layer(rel, geo, ratio, method, gen)
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
    """Closed-form parameter counts of the original (kept=None) or pruned model: linear weights, everything else."""
    c = _cfg_get(config)
    geo = Geometry.from_config(config)
    h, d, g = geo.hidden_size, geo.head_dim, geo.group
    vocab = int(c("vocab_size"))
    qwen2 = str(c("model_type") or "").startswith("qwen2")
    attn_bias = bool(c("attention_bias"))
    mlp_bias = bool(c("mlp_bias"))
    tied = bool(c("tie_word_embeddings"))

    linear = 0
    other = vocab * h * (1 if tied else 2) + h  # embeddings (+ lm_head unless tied) + final norm
    for i in range(geo.num_layers):
        lk = kept.layers.get(i) if kept is not None else None
        n_kv = len(lk.kv_heads) if lk else geo.num_kv_heads
        n_i = len(lk.neurons) if lk else geo.intermediate_size
        qd, kvd = n_kv * g * d, n_kv * d
        linear += h * qd * 2 + h * kvd * 2 + 3 * h * n_i
        other += 2 * h  # input / post-attention RMSNorm
        if qwen2:
            other += qd + 2 * kvd  # q/k/v biases, o_proj has none
        elif attn_bias:
            other += qd + 2 * kvd + h
        if mlp_bias:
            other += 2 * n_i + h
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
