"""Merge a trained adapter into its base and write a full model folder loadable by transformers.

Two merge targets (``onto``):

- ``original``: the base as stored (what PEFT's ``merge_and_unload`` on a reloaded full-precision base gives); the
  merged model differs from the trained one (4-bit base + adapter) by the base's quantization error;
- ``dequantized``: the decoder's linear layers dequantized from the same 4-bit copy the adapter was trained on; the
  merged model computes exactly what was trained (up to the output dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import dense_weight, is_4bit
from slimtune.adapters.export import load_native
from slimtune.adapters.inject import merge
from slimtune.errors import SlimtuneError
from slimtune.models.load import DTYPES, ModelConfig, QuantConfig, load_model, resolve_package_path

ONTO = ("original", "dequantized")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the chat template a run trained with, saved beside its native adapter


def trained_chat_template(adapter_dir: Path) -> str | None:
    """The chat template the run trained with (saved by the trainer next to the native adapter), if any."""
    p = Path(adapter_dir) / CHAT_TEMPLATE_FILE
    return p.read_text(encoding="utf-8") if p.is_file() else None


def load_merged(
    model_cfg: ModelConfig, adapter_dir: Path, *, onto: str = "dequantized", quant: QuantConfig | None = None,
):
    """The base with the native adapter merged in, fp32 on CPU, every layer a dense nn.Linear. Returns LoadedModel.

    ``quant`` (``onto="dequantized"``): the 4-bit settings the run trained with (default: NF4, double quant, 64).
    """
    if onto not in ONTO:
        raise SlimtuneError(f"--onto {onto}: choose one of {', '.join(ONTO)}")
    if onto == "dequantized":
        q = (quant or QuantConfig()).model_copy(update={"compute_dtype": "float32"})
        if q.mode == "none":
            q = q.model_copy(update={"mode": "nf4"})
    else:
        q = QuantConfig(mode="none", compute_dtype="float32")
    loaded = load_model(model_cfg, q, device="cpu")
    load_native(loaded.model, adapter_dir)
    merge(loaded.model, dtype=torch.float32)
    densify(loaded.model)
    template = trained_chat_template(adapter_dir)
    if template is not None:  # the merged model answers in the format it was trained on
        loaded.tokenizer.chat_template = template
    return loaded


def densify(model: nn.Module) -> int:
    """Replace every remaining 4-bit linear (layers without an adapter) by an nn.Linear holding its dequantized
    weight. Returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        bias = getattr(module, "bias", None)
        lin = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
        with torch.no_grad():
            lin.weight = nn.Parameter(dense_weight(module, torch.float32), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
        count += 1
    return count


def merge_to_folder(
    model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path, *, dtype: str = "bfloat16", onto: str = "original",
    quant: QuantConfig | None = None,
) -> Path:
    """Merge the native adapter in ``adapter_dir`` into its base (``onto``: see the module docstring), save in
    ``dtype`` with the tokenizer."""
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    loaded = load_merged(model_cfg, Path(adapter_dir), onto=onto, quant=quant)
    model = loaded.model.to(DTYPES[dtype])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    make_saveable(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out_dir)
    kept = Path(resolve_package_path(model_cfg.name)) / "loram.json"
    if kept.is_file():  # a LoRAM-pruned base: the merged model keeps the pruned shapes, so it needs the map too
        shutil.copy2(kept, out_dir / "loram.json")
    return out_dir


def make_saveable(model: torch.nn.Module) -> torch.nn.Module:
    """A model loaded from a GGUF file holds plain dequantized tensors, but transformers still marks it as
    GGUF-quantized, which save_pretrained refuses; drop that marker (the saved folder is an ordinary model)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions (it then follows hf_quantizer)
            pass
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    # bitsandbytes layers were replaced by dense ones (densify): the 4-bit marker would make loaders expect bnb
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def save_model_folder(model: nn.Module, tokenizer: Any, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """A fully fine-tuned model as a transformers folder (``from_pretrained`` loads it), weights in ``dtype``; the
    training model itself is left as it is (tied weights stay tied: save_pretrained writes them once)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_saveable(model)
    state = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in model.state_dict().items()}
    model.config.use_cache = True
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
