"""Merge a trained adapter into its base and write a full model folder loadable by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from slimtune.adapters.export import load_native
from slimtune.adapters.inject import merge
from slimtune.models.load import DTYPES, ModelConfig, QuantConfig, load_model, resolve_package_path


def merge_to_folder(model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Load the base unquantized on CPU (fp32), apply the native adapter, merge, save in ``dtype``.

    Merging onto the full-precision base (not the NF4 copy used for training) is what PEFT's merge_and_unload on
    a reloaded base does; the difference from the training-time model is the base's quantization error.
    """
    loaded = load_model(model_cfg, QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
    model = loaded.model
    load_native(model, adapter_dir)
    merge(model, dtype=torch.float32)
    model = model.to(DTYPES[dtype])
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
    return model
