"""The LoRAM-pruned model folder: its kept-index map (``loram.json``) and its loader.

A pruned folder (written by ``slimtune.loram.prune``) holds the ORIGINAL model's config.json, safetensors weights
with the pruned shapes, and ``loram.json``: which KV-head groups and MLP neurons of which layers were kept
(``KeptIndex``). ``load_pruned`` builds the original architecture on the meta device, swaps the pruned layers'
projections for linears of the kept shapes and assigns the stored tensors; ``slimtune.models.load.load_model``
calls it for a folder with a ``loram.json``. The pruning itself (scores, selection, streaming a checkpoint) lives
in ``slimtune.loram.prune``; this module is the format both sides share, below them in the layering.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from slimtune.errors import ModelError
from slimtune.io import write_text_atomic
from slimtune.models.arch import ArchSpec, spec_for
from slimtune.models.arch import Geometry as ArchGeometry


KEPT_FILE = "loram.json"


FORMAT = "slimtune.loram.kept/1"


def family_spec(config: Any) -> ArchSpec:
    """The ArchSpec LoRAM prunes by (a config, its dict, or a model_type); ModelError when none or not prunable."""
    spec = spec_for(config)
    if spec is None:
        mt = config if isinstance(config, str) else _cfg_get(config)("model_type")
        raise ModelError(f"LoRAM prune: no family describes model_type {mt!r}")
    why = spec.loram_prunable(config) if not isinstance(config, str) else None
    if why is not None:
        raise ModelError(f"LoRAM prune: {spec.name}: {why}")
    return spec


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
        spec = spec_for(config) or spec_for("llama")
        try:
            g = spec.geometry(config)
            geo = cls(g.hidden, g.layers, g.heads, g.kv_heads, g.head_dim, g.intermediate)
            heads, kv = g.heads, g.kv_heads
        except (TypeError, ValueError, KeyError) as err:
            raise ModelError(f"LoRAM prune: config lacks a decoder geometry ({err})") from err
        if heads % kv:
            raise ModelError(f"LoRAM prune: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return geo

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def arch(self, spec: ArchSpec, **changes: int):
        """The same shapes as ``slimtune.models.arch.Geometry`` (what ArchSpec.shapes takes)."""
        return ArchGeometry(hidden=self.hidden_size, intermediate=self.intermediate_size, heads=self.num_heads,
                            kv_heads=self.num_kv_heads, head_dim=self.head_dim, layers=self.num_layers,
                            vocab=0).with_(**changes)


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
    @property
    def spec(self) -> ArchSpec:
        """The family the map was made on (maps without a recorded config are Llama's)."""
        return family_spec(self.original_config if self.original_config.get("model_type") else "llama")

    def q_heads(self, layer: int) -> list[int]:
        """Kept query heads of a pruned layer: exactly the G heads of each kept KV head, ascending."""
        g = self.geometry.group
        return [h * g + j for h in self.layers[layer].kv_heads for j in range(g)]

    def role_channels(self, layer: int, role: str) -> torch.Tensor:
        """Kept channels of one role (q/k/v/o: head channels; gate/up/down: neurons) of a pruned layer."""
        d = self.geometry.head_dim
        if role in ("q", "o"):
            heads = self.q_heads(layer)
        elif role in ("k", "v"):
            heads = self.layers[layer].kv_heads
        elif role in ("gate", "up", "down"):
            return torch.tensor(self.layers[layer].neurons, dtype=torch.long)
        else:
            raise KeyError(role)
        return (torch.tensor(heads, dtype=torch.long)[:, None] * d + torch.arange(d)).reshape(-1)

    def channels(self, layer: int, proj: str) -> torch.Tensor | None:
        """Kept indices along the pruned dimension of module `proj` (rows for q/k/v/gate/up, columns for o/down;
        a packed module's parts one after the other, e.g. Phi-3's qkv_proj: q rows, then k, then v), as an int64
        tensor in ascending order; None when the layer is not pruned."""
        if layer not in self.layers:
            return None
        p = self.spec.proj(proj)
        geo = self.geometry.arch(self.spec)
        out, offset = [], 0
        for role in p.parts:
            out.append(self.role_channels(layer, role) + offset)
            offset += geo.role_out(role) if p.prune == "out" else geo.role_in(role)
        return torch.cat(out)

    def original_size(self, proj: str) -> int:
        """Size of `proj`'s pruned dimension in the original model."""
        p = self.spec.proj(proj)
        out_f, in_f = self.spec.shapes(self.geometry.arch(self.spec))[proj]
        return out_f if p.prune == "out" else in_f

    def pruned_dim(self, proj: str) -> str:
        """"out" (rows) or "in" (columns): the dimension of `proj`'s weight that pruning shrinks."""
        return self.spec.proj(proj).prune

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
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

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


def _cfg_get(config: Any):
    if isinstance(config, Mapping):
        return lambda k: config.get(k)
    return lambda k: getattr(config, k, None)


def _slice_layer(t: Mapping[str, torch.Tensor], kept: KeptIndex, layer: int) -> dict[str, torch.Tensor]:
    """New tensors for the layer's projections (weights and biases along the pruned dimension only); other
    entries of `t` are not returned. The output-side bias of o_proj/down_proj is not pruned and is returned as is."""
    spec = kept.spec
    out: dict[str, torch.Tensor] = {}
    for p in spec.projections:
        key = spec.block_of(p.name)
        idx = kept.channels(layer, p.name)
        w = t[f"{key}.weight"]
        idx = idx.to(w.device)
        out[f"{key}.weight"] = w.index_select(0 if p.prune == "out" else 1, idx)
        b = t.get(f"{key}.bias")
        if b is not None:
            out[f"{key}.bias"] = b.index_select(0, idx) if p.prune == "out" else b
    return out


def _decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    layers = spec.decoder_layers(model)
    if layers is None:
        raise ModelError(f"LoRAM prune: {type(model).__name__} has no {spec.decoder}")
    return layers


def _layer_tensors(layer: nn.Module, where: str, spec: ArchSpec) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for proj in spec.proj_names:
        key = spec.block_of(proj)
        mod = spec.module(layer, key)
        if type(mod) is not nn.Linear:
            kind = type(mod).__name__
            raise ModelError(
                f"LoRAM prune: {where}.{key} is {kind}, expected a plain nn.Linear "
                "(prune the unquantized base before adding adapters or quantizing)"
            )
        t[f"{key}.weight"] = mod.weight.data
        if mod.bias is not None:
            t[f"{key}.bias"] = mod.bias.data
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
    spec = kept.spec
    for proj in spec.proj_names:
        name = spec.block_of(proj)
        block = spec.module(layer, name.rpartition(".")[0])
        old = getattr(block, proj)
        setattr(block, proj, _new_linear(new[f"{name}.weight"], new.get(f"{name}.bias"), old))
    lk = kept.layers[i]
    _set_head_counts(layer, len(lk.kv_heads) * kept.geometry.group, len(lk.kv_heads), len(lk.neurons))


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
    spec = kept.spec
    layers = _decoder_layers(model, spec)
    geo = kept.geometry
    for i in kept.layers:  # meta tensors: slicing them allocates nothing, it only gives the kept shapes
        tensors = _layer_tensors(layers[i], f"{spec.decoder}.{i}", spec)
        _install_layer(layers[i], kept, i, _slice_layer(tensors, kept, i))

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
        kv_proj = spec.role_proj("k")
        got = spec.module(layers[i], spec.block_of(kv_proj.name)).weight.shape[0]
        want = spec.shapes(geo.arch(spec, kv_heads=len(lk.kv_heads), heads=len(lk.kv_heads) * geo.group))[kv_proj.name]
        if got != want[0]:
            raise ModelError(f"{path}: layer {i} {kv_proj.name} does not match {KEPT_FILE}")
    return model
