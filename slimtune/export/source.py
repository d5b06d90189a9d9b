"""Lazy, tensor-by-tensor access to a base model's weights and to a PEFT adapter's per-module deltas.

Nothing here holds more than one tensor of the base in fp32 at a time: safetensors shards are memory-mapped
(``safe_open``) and a GGUF base is read through `gguf.GGUFReader` (also an mmap) and dequantized per tensor.
Tensors come out in Hugging Face layout ((out, in), rows in HF order) under llama.cpp names (``blk.3.attn_q.weight``);
the GGUF writer applies llama.cpp's Q/K row permutation itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from slimtune.adapters.dora import dora_merge
from slimtune.errors import SlimtuneError
from slimtune.models.prequantized import quantized_names
from slimtune.ops.nf4 import NF4Weight, dense_weight


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama-family Q/K weights (its RoPE rotates adjacent pairs, HF rotates halves).

    Within each head the rows [0..d/2) and [d/2..d) are interleaved: (n_head, 2, d/2, ...) → (n_head, d/2, 2, ...).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class BaseTensors:
    """The base's tensors by llama.cpp name: ``shapes`` up front, ``get(name)`` one fp32 tensor (HF layout)."""

    shapes: dict[str, tuple[int, ...]]
    _get: object = field(repr=False)
    gguf_fields: dict = field(default_factory=dict, repr=False)  # a GGUF base's metadata (tokenizer.ggml.pre, …)
    stored_4bit: set[str] = field(default_factory=set)  # stored as bitsandbytes 4-bit: ``get`` dequantizes them

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)  # type: ignore[operator]


def hf_to_gguf_name(name_map, hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (None when llama.cpp has no such tensor)."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def open_gguf_base(path: Path, *, qk_heads: dict[str, int]) -> BaseTensors:
    """A GGUF base: tensors are already under llama.cpp names; Q/K rows are un-permuted back to HF order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in by_name.items()}

    def get(name: str) -> torch.Tensor:
        t = by_name[name]
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(shapes[name])
        w = torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr))
        kind = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if kind in qk_heads:  # a Llama-arch GGUF stores Q/K permuted; the merge works in HF order
            w = unpermute_qk(w, qk_heads[kind])
        return w

    return BaseTensors(shapes=shapes, _get=get, gguf_fields=dict(reader.fields))


def open_safetensors_base(folder: Path, name_map, *, tied: bool) -> BaseTensors:
    """An HF folder's ``*.safetensors`` shards, memory-mapped; HF names mapped to llama.cpp's. The 4-bit weights of a
    pre-quantized bitsandbytes checkpoint come out dequantized (fp32), their quant-state tensors are no tensors."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimtuneError(f"{folder}: no *.safetensors files (GGUF export reads safetensors or a .gguf base)")
    located: dict[str, Path] = {}  # checkpoint name -> its shard
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            located.update((key, f) for key in sf.keys())
    owner = quantized_names(located)  # the parts of each 4-bit weight -> that weight
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, f in located.items():
        if (tied and key == "lm_head.weight") or owner.get(key, key) != key:
            continue
        g = hf_to_gguf_name(name_map, key)
        if g is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise SlimtuneError(f"{folder}: tensor {key} has no llama.cpp name for this architecture")
        where[g] = key
        if key in owner:
            shapes[g] = tuple(_quant_state(located, owner, key).shape)
            continue
        with safe_open(str(f), framework="pt") as sf:
            shapes[g] = tuple(sf.get_slice(key).get_shape())

    def read(key: str) -> torch.Tensor:
        with safe_open(str(located[key]), framework="pt") as sf:
            return sf.get_tensor(key)

    def get(name: str) -> torch.Tensor:
        key = where[name]
        if key not in owner:
            return read(key).to(torch.float32)
        qs = _quant_state(located, owner, key)
        return dense_weight(NF4Weight.from_quant_state(read(key), qs), torch.float32)

    return BaseTensors(shapes=shapes, _get=get, stored_4bit={g for g, k in where.items() if k in owner})


def _quant_state(located: dict[str, Path], owner: dict[str, str], key: str):
    """The bitsandbytes QuantState of the stored 4-bit weight ``key`` (its parts read from their shards)."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    parts = {}
    for part in (k for k, w in owner.items() if w == key and k != key):
        with safe_open(str(located[part]), framework="pt") as f:
            parts[part[len(key) + 1:]] = f.get_tensor(part)
    return bnbf.QuantState.from_dict(parts, device="cpu")


@dataclass
class ModuleDelta:
    """One adapted linear layer: W' = W + scale·B A, then DoRA's row rescale when ``magnitude`` is set."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    magnitude: torch.Tensor | None = None  # (out,)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.B.to(torch.float32) @ self.A.to(torch.float32))
        if self.magnitude is not None:  # PEFT's DoRA: m · (W + sBA) / ‖W + sBA‖ per output row
            return dora_merge(w, delta, self.magnitude)
        return w + delta


@dataclass
class PeftAdapter:
    """A PEFT LoRA folder read into per-module deltas keyed by HF module name, plus fully saved modules."""

    config: dict
    deltas: dict[str, ModuleDelta]
    saved: dict[str, torch.Tensor]  # HF parameter name → full tensor (modules_to_save)

    @property
    def alpha_over_rank(self) -> float:
        return float(self.config["lora_alpha"]) / float(self.config["r"])


def read_peft(folder: Path) -> PeftAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` (ranks and alphas per module included)."""
    from safetensors.torch import load_file

    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise SlimtuneError(f"{folder}: not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise SlimtuneError(f"{folder}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    state = load_file(str(w_path))
    prefix = "base_model.model."
    deltas: dict[str, ModuleDelta] = {}
    saved: dict[str, torch.Tensor] = {}
    modules = sorted({k[len(prefix):].rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k})
    for mod in modules:
        A = state[f"{prefix}{mod}.lora_A.weight"]
        B = state[f"{prefix}{mod}.lora_B.weight"]
        r = int(_pattern(cfg.get("rank_pattern") or {}, mod, cfg["r"]))
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"]))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        mag = state.get(f"{prefix}{mod}.lora_magnitude_vector")
        deltas[mod] = ModuleDelta(A=A, B=B, scale=scale, magnitude=mag)
    for k, t in state.items():
        if ".lora_" not in k and k.startswith(prefix):
            name = k[len(prefix):].replace(".modules_to_save.default", "")
            saved[name] = t
    return PeftAdapter(config=cfg, deltas=deltas, saved=saved)


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: an exact module name, else a key that the name ends with."""
    if module in patterns:
        return patterns[module]
    for key, value in patterns.items():
        if module.endswith("." + key) or module == key:
            return value
    return default


def iter_layer_order(shapes: dict[str, tuple[int, ...]]) -> Iterator[str]:
    """Tensor names in llama.cpp's usual order: token_embd, blk.0.*, blk.1.*, …, output_norm, output."""
    def key(n: str):
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return (0 if n.startswith("token_embd") else 2, 0, n)

    yield from sorted(shapes, key=key)
