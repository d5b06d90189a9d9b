"""Streaming load: a model built on the meta device and filled one checkpoint tensor at a time (model.load: stream).

``stream_model`` reads safetensors shards (a local folder or a hub snapshot) with plain reads, ``stream_gguf`` a GGUF
file through gguf's reader and transformers' own GGUF name map and tensor processors; each linear weight is
quantized to NF4/FP4 (+ double quant) on the target device as it arrives (``quantized_weight``, in row chunks of
whole 4-bit blocks, bit-identical to bitsandbytes' whole-tensor quantization), every other tensor is cast and
placed. Host RAM peaks near one tensor (plus one quantization chunk) on top of what stays on the host.
``slimtune.models.load.load_model`` decides when to stream and falls back to ``from_pretrained`` otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from slimtune.errors import ModelError

if TYPE_CHECKING:  # the recipe blocks, for annotations only (load.py imports this module)
    from slimtune.models.load import ModelConfig, QuantConfig


def linear4bit(module: nn.Linear, *, mode: str, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """An empty (meta) bitsandbytes Linear4bit with ``module``'s shape; its weight is set by ``quantized_weight``."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type=mode, device="meta",
    )
    # bitsandbytes repacks CPU weights into an AVX512-BF16 layout (bf16 math) in eval mode; that changes the
    # numerics and the packed format the fused kernels read, so keep the canonical layout.
    q.support_avx512bf16_for_cpu = False
    return q


#: Values per quantization call. bitsandbytes' CPU quantizer holds ~3.5x its fp32 input in temporaries (a 5632 x
#: 2048 weight: 164 MiB peak for a 44 MiB input; the 32000 x 2048 head: 894 MiB), so weights go through in row
#: chunks of whole 4-bit blocks; the result is bit-identical (blocks are independent; double quant runs once, on
#: all the absmax values).
QUANT_CHUNK_VALUES = 1 << 22


def quantized_weight(weight: torch.Tensor, *, mode: str, double_quant: bool, blocksize: int, device,
                     dtype: torch.dtype | None = None) -> nn.Parameter:
    """bitsandbytes Params4bit of a dense (out, in) weight, quantized on ``device`` chunk by chunk (fp32 input).

    The quant state declares ``dtype`` (default: the weight's own, as ``bitsandbytes.functional.quantize_4bit``
    does): the dtype bitsandbytes dequantizes to. Pass the compute dtype: the packed codes and absmax do not
    depend on it, but a bf16 run whose weights declared fp32 would dequantize every weight into an fp32 copy
    (and miss bitsandbytes' CUDA ``dequantize_4bit(out=)``, which needs the buffer's dtype).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    rows, cols = weight.shape[0], weight.numel() // max(weight.shape[0], 1)
    whole = blocksize // math.gcd(cols, blocksize)  # rows per chunk must make whole blocks
    step = max(whole, QUANT_CHUNK_VALUES // max(cols, 1) // whole * whole)
    flat = weight.detach().reshape(-1)
    packed, absmax = [], []
    for r in range(0, rows, step):
        x = flat[r * cols:(r + step) * cols].to(torch.float32).to(device)  # (chunk,) fp32, converted where it is
        codes, amax = torch.ops.bitsandbytes.quantize_4bit.default(x, blocksize, mode, torch.uint8)
        packed.append(codes)
        absmax.append(amax)
        del x
    data, amax = torch.cat(packed), torch.cat(absmax)  # (numel / 2, 1) uint8, (numel / blocksize,) fp32
    code = bnbf.get_4bit_type(mode, device=data.device)
    shape, dtype = weight.shape, weight.dtype if dtype is None else dtype
    if double_quant:  # what bnbf.quantize_4bit does with compress_statistics
        offset = amax.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(amax - offset, blocksize=256)
        state = bnbf.QuantState(absmax=qabsmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code,
                                quant_type=mode, offset=offset, state2=state2)
    else:
        state = bnbf.QuantState(absmax=amax, shape=shape, dtype=dtype, blocksize=blocksize, code=code,
                                quant_type=mode)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=double_quant, quant_type=mode, quant_storage=torch.uint8,
                             bnb_quantized=True)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def safetensors_files(src: str, model_cfg: ModelConfig) -> list[Path] | None:
    """The safetensors shards of a local folder or a hub repo (downloaded / read from the hub cache)."""
    folder = Path(src)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(src, revision=model_cfg.revision,
                                            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # offline and not cached, no such repo, ...: one line
            why = " ".join(str(e).split())
            raise ModelError(f"model.name: cannot load {model_cfg.name}: {type(e).__name__}: {why}") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def stream_model(
    files: list[Path], model_cfg: ModelConfig, quant_cfg: QuantConfig, *, device: torch.device, dtype: torch.dtype,
) -> tuple[nn.Module | None, str | None]:
    """Build the model with its parameters on the meta device and fill it one safetensors tensor at a time.

    Each linear weight is quantized (NF4/FP4, double quant as configured) on ``device`` as it is read, every other
    tensor is cast to ``dtype`` and placed on ``device``. Host RAM peaks near one tensor read (plus bitsandbytes'
    temporaries for one chunk) on top of what stays on the host (everything, when ``device`` is the CPU). Same
    tensors as ``from_pretrained`` + :func:`quantize_linears` (test: tests/models/test_load_streaming.py). Returns
    (model, None), or (None, why) when the checkpoint's tensor names do not match the model (transformers would
    convert them on load).
    """
    from transformers import AutoConfig

    src = str(files[0].parent)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.name: cannot load {model_cfg.name}: {e}") from e
    model = _empty_model(config, model_cfg, dtype)
    expected = _expected_names(model)
    keys: dict[str, str] = {}  # checkpoint name -> model name
    for f in files:
        for k in _safetensors_header(f)[0]:
            keys[k] = k if k in expected or f"model.{k}" not in expected else f"model.{k}"
    why = _name_mismatch(model, expected, set(keys.values()))
    if why is not None:
        return None, why

    def tensors():
        for f in files:
            for k, t in _read_safetensors(f):
                yield keys[k], t
            release_host_memory()  # the shard's tensors are freed: give the heap pages back before the next one

    _fill(model, tensors(), quant_cfg, device=device, dtype=dtype, source=model_cfg.name)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src)
    except Exception:  # no generation_config.json: keep the one from_config derived
        pass
    return model, None


def stream_gguf(
    path: Path, model_cfg: ModelConfig, quant_cfg: QuantConfig, *, device: torch.device, dtype: torch.dtype,
) -> tuple[nn.Module | None, str | None]:
    """:func:`stream_model` for a GGUF file: each tensor is dequantized (gguf), un-permuted where transformers'
    per-architecture tensor processor does it (Llama's q/k rows), quantized and placed, one at a time.

    Uses transformers' own GGUF name map and tensor processors (``transformers.modeling_gguf_pytorch_utils``), so
    the tensors are the ones ``from_pretrained(gguf_file=...)`` builds; architectures whose processor merges or
    splits tensors (MoE experts, ...) return (None, why) and go through ``from_pretrained``. The file's memory map
    is told to drop each tensor's pages once used (``MADV_DONTNEED``), so RSS does not grow with the file.
    """
    import mmap

    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelError(f"model.name: cannot load {model_cfg.name}: {e}") from e
    reader = GGUFReader(str(path))
    arch = hf_gguf.read_field(reader, "general.architecture")[0]
    cls = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)
    if cls not in (hf_gguf.TensorProcessor, hf_gguf.LlamaTensorProcessor):
        return None, f"GGUF architecture {arch}: transformers' {cls.__name__} may merge or split tensors"
    # what LlamaTensorProcessor reads (the head counts for the q/k un-permutation), from the config built above
    parsed = {"config": {"num_attention_heads": config.num_attention_heads,
                         "num_key_value_heads": config.num_key_value_heads}}
    processor = cls(config=parsed["config"])
    model = _empty_model(config, model_cfg, dtype)
    mapping = hf_gguf.get_gguf_hf_weights_map(model, processor)
    why = _name_mismatch(model, _expected_names(model), {mapping[t.name] for t in reader.tensors if t.name in mapping})
    if why is not None:
        return None, why
    pages = getattr(reader.data, "_mmap", None)

    def tensors():
        for t in reader.tensors:
            if t.name not in mapping:
                continue
            res = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                    tensor_key_mapping=mapping, parsed_parameters=parsed)
            w = res.weights  # a fresh fp32 array from dequantize; a view of the file for plain F32/F16 tensors
            value = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else np.array(w))
            if pages is not None and hasattr(mmap, "MADV_DONTNEED"):
                pages.madvise(mmap.MADV_DONTNEED)  # read-only shared map: the pages stay in the page cache
            yield mapping[res.name], value

    _fill(model, tensors(), quant_cfg, device=device, dtype=dtype, source=model_cfg.name)
    release_host_memory()
    return model, None


def _empty_model(config, model_cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code)
        model.tie_weights()  # not done under init_empty_weights (transformers 5.24)
    except Exception as e:
        raise ModelError(f"model.name: cannot load {model_cfg.name}: {e}") from e
    return model


def _expected_names(model: nn.Module) -> set[str]:
    """Parameter names (tied ones once) and persistent buffers: what a checkpoint must provide."""
    expected = {n for n, _ in model.named_parameters()}
    return expected | {n for n in model.state_dict() if n not in expected and "." in n}


def _name_mismatch(model: nn.Module, expected: set[str], have: set[str]) -> str | None:
    tied = _tied_head(model)
    missing = expected - have - ({"lm_head.weight"} if tied else set())
    if missing:
        return f"{len(missing)} model tensors have no checkpoint tensor of that name (e.g. {min(missing)})"
    extra = have - expected - {"lm_head.weight"}
    if extra:
        return f"{len(extra)} checkpoint tensors match no model tensor (e.g. {min(extra)})"
    return None


def _fill(model: nn.Module, tensors, quant_cfg: QuantConfig, *, device: torch.device, dtype: torch.dtype,
          source: str) -> None:
    """Quantize-as-they-come: swap the linears for empty Linear4bit, then place every (name, tensor)."""
    tied = _tied_head(model)
    quantized = set()
    if quant_cfg.mode != "none":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (quant_cfg.quantize_lm_head or not name.endswith("lm_head")):
                set_module(model, name, linear4bit(module, mode=quant_cfg.mode, compute_dtype=dtype,
                                                     double_quant=quant_cfg.double_quant))
                quantized.add(f"{name}.weight")
    q = dict(mode=quant_cfg.mode, double_quant=quant_cfg.double_quant, blocksize=quant_cfg.blocksize, device=device)
    for name, t in tensors:
        if name == "lm_head.weight" and tied:
            continue  # the tied head is the embedding (set below)
        _place(model, name, t, quantized=quantized, dtype=dtype, q=q)
        if tied and name == tied and "lm_head.weight" in quantized:
            _place(model, "lm_head.weight", t, quantized=quantized, dtype=dtype, q=q)
        del t
    if tied and "lm_head.weight" not in quantized:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    finish_fill(model, device=device, dtype=dtype, source=source)


def finish_fill(model: nn.Module, *, device: torch.device, dtype: torch.dtype, source: str) -> None:
    """After the checkpoint's tensors: the model's own buffers (rotary tables) cast and placed; a parameter still on
    the meta device (no checkpoint tensor filled it) is a one-line error."""
    for name, b in list(model.named_buffers()):
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf in mod._buffers and mod._buffers[leaf] is b:
            mod._buffers[leaf] = b.to(device, dtype) if b.is_floating_point() else b.to(device)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelError(f"model.name: {source}: {len(left)} tensors were not in the checkpoint ({left[0]})")


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries by name, offset of the data section) of a safetensors file (format: u64 header length,
    JSON header with dtype / shape / data_offsets per tensor, then the raw little-endian data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_safetensors(path: Path):
    """Yield (name, tensor) of a safetensors file one tensor at a time, each read into its own host buffer.

    Plain reads instead of safetensors' memory map: the pages of a mapped shard that a quantization touches stay
    in this process's RSS until the map closes (measured: +22 MiB per 11.5M-value bf16 weight, the whole shard
    by its end); a read costs one tensor and leaves the rest to the page cache, which the kernel can drop.
    """
    header, start = _safetensors_header(path)
    with open(path, "rb") as f:
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            lo, hi = e["data_offsets"]
            buf = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(start + lo)
            if hi > lo and f.readinto(buf.numpy()) != hi - lo:
                raise ModelError(f"model.name: {path}: truncated safetensors file ({name})")
            yield name, buf.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])
            del buf


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS follows live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _tied_head(model: nn.Module) -> str | None:
    """The model name of the embedding that lm_head is tied to, or None when the head has its own weight."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next(n for n, p in model.named_parameters() if p is inp.weight)


def _place(model: nn.Module, name: str, t: torch.Tensor, *, quantized: set[str], dtype: torch.dtype,
           q: dict) -> None:
    """Put checkpoint tensor ``t`` into ``model`` at ``name`` (quantized, or cast to ``dtype``), frozen."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if name in quantized:
        # the old path cast the whole model to the compute dtype before quantizing: same rounding here
        mod.weight = quantized_weight(t.to(dtype), dtype=dtype, **q)
        return
    value = t.to(q["device"], dtype) if t.is_floating_point() else t.to(q["device"])  # t is our own buffer
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value
