"""Write a merged model as one GGUF file for llama.cpp / Ollama / LM Studio, in Python (no llama.cpp build).

``export_gguf`` streams: the header (architecture metadata, tokenizer, tensor table) is written first, then each
tensor is read from the base (mmap), merged with its adapter delta in fp32, permuted to llama.cpp's Q/K row order
(Llama-architecture files), quantized and appended. At most one base tensor, its merged copy and its quantized
bytes are alive at a time, so the host RAM needed is about twice the largest tensor plus the mmap'd pages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, TokenType, get_tensor_name_map
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import MODEL_ARCH_NAMES

from slimtune.errors import SlimtuneError
from slimtune.export.gguf_spm import is_spm_bpe, llama3_rope_factors, spm_facts
from slimtune.export.kquants import quantize_k
from slimtune.export.mixes import FILE_TYPES, tensor_type
from slimtune.export.source import (
    BaseTensors, PeftAdapter, hf_to_gguf_name, iter_layer_order, open_gguf_base, open_safetensors_base, permute_qk,
)
from slimtune.models.arch import spec_for
from slimtune.models.load import ModelConfig, load_tokenizer, resolve_package_path
from slimtune.ops.nf4 import dense_weight, quantize_4bit

WRITABLE_ARCHS = ("llama", "qwen2")  # llama.cpp architectures this writer fills the metadata of (Mistral → llama)
PERMUTED_ARCHS = ("llama",)  # llama.cpp's llama graph rotates adjacent pairs: Q/K rows are permuted on export
ONTO = ("original", "dequantized")


@dataclass
class GGUFExport:
    """What `export_gguf` wrote (for the CLI summary and the benchmarks)."""

    path: Path
    quant: str
    arch: str
    onto: str
    types: dict[str, int] = field(default_factory=dict)  # GGML type name → number of tensors
    seconds: float = 0.0


def resolve_base(name: str) -> tuple[Path, dict]:
    """A model name as recipes spell it → (folder, transformers kwargs): ``{"gguf_file": ...}`` for a GGUF."""
    p = Path(resolve_package_path(name))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SlimtuneError(f"{name}: no such GGUF file")
        return p.parent, {"gguf_file": p.name}
    if p.is_dir():
        return p, {}
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True)), {}
    except Exception:
        raise SlimtuneError(f"{name}: not a local folder, a .gguf file, or a hub model in the local cache") from None


def check_writable(config) -> str:
    """llama.cpp's architecture name for ``config``, or a one-line error naming what cannot be written."""
    spec = spec_for(config)
    mt = getattr(config, "model_type", None)
    if spec is None or spec.gguf_arch not in WRITABLE_ARCHS:
        raise SlimtuneError(f"GGUF export: model type {mt!r} is not supported (supported: llama, mistral, qwen2)")
    rt = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rt not in ("default", "linear", "llama3") or (rt == "llama3" and spec.gguf_arch != "llama"):
        raise SlimtuneError(f"GGUF export: rope_type {rt!r} is not supported yet (default, linear, llama3 are)")
    return spec.gguf_arch


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint does not hold: ``rope_freqs.weight`` for llama3 RoPE scaling."""
    theta, rp = _rope(config)
    if rp.get("rope_type") == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(rp, _head_dim(config), theta)}
    return {}


def _rope(config) -> tuple[float, dict]:
    rp = getattr(config, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), rp


def add_arch_metadata(w: GGUFWriter, config, arch: str, *, name: str) -> None:
    """general.* and ``{arch}.*`` keys llama.cpp reads for a Llama/Qwen2-style decoder."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(kv))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    theta, rp = _rope(config)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != config.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if rp.get("rope_type") == "linear":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    w.add_vocab_size(int(config.vocab_size))


_PRE_BY_SOURCE = {"qwen2": "qwen2"}


def tokenizer_facts(tok, config, gguf_fields: dict | None = None) -> dict:
    """Vocabulary, merges or scores, token types, special ids and chat template of the tokenizer.

    Byte-level BPE (Llama 3, Qwen2, SmolLM2) is written as llama.cpp's ``gpt2`` model with merges; byte-fallback
    BPE (Llama-2, Mistral v0.1–0.3: SentencePiece-style) as its ``llama`` model with scores. Anything else is a
    one-line SlimtuneError.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SlimtuneError("GGUF export: needs a fast (tokenizers) tokenizer")
    tj = json.loads(backend.to_str())
    model = tj["model"]
    n = max(int(config.vocab_size), len(tok))
    probe = tok("a")["input_ids"]
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    common = {
        "add_bos": bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id),
        "add_eos": bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id),
        "template": template,
        "bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id,
    }
    if is_spm_bpe(model):
        return {"model": "llama", **spm_facts(tok, tj, n), **common}
    if model.get("type") != "BPE":
        raise SlimtuneError(
            f"GGUF export: tokenizer model {model.get('type')} is not supported; byte-level BPE (Llama 3, Qwen2, "
            "SmolLM2) and byte-fallback BPE (Llama-2, Mistral) tokenizers are"
        )
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for piece, i in model["vocab"].items():
        tokens[i], types[i] = piece, int(TokenType.NORMAL)
    for added in tj.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    field_ = (gguf_fields or {}).get("tokenizer.ggml.pre")  # a GGUF base names llama.cpp's pre-tokenizer itself
    pre = field_.contents() if field_ is not None else None
    if pre is None:
        pre = _PRE_BY_SOURCE.get(getattr(config, "model_type", ""), "llama-bpe" if n >= 128000 else "gpt2")
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "pre": pre, **common}


def add_tokenizer(w: GGUFWriter, facts: dict) -> None:
    w.add_tokenizer_model(facts["model"])
    w.add_tokenizer_pre(facts.get("pre", "default"))
    w.add_token_list(facts["tokens"])
    if facts["model"] == "llama":
        w.add_token_scores(facts["scores"])
        w.add_add_space_prefix(facts["add_space_prefix"])
    w.add_token_types(facts["types"])
    if facts["model"] == "gpt2":
        w.add_token_merges(facts["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if facts[key] is not None:
            add(int(facts[key]))
    w.add_add_bos_token(facts["add_bos"])
    w.add_add_eos_token(facts["add_eos"])
    if facts["template"]:
        w.add_chat_template(facts["template"])


def encode(w: torch.Tensor, qtype: T) -> np.ndarray:
    """fp32 (out, in) → the bytes (or f16/bf16/f32 array) GGUF stores for ``qtype``."""
    if qtype == T.F32:
        return w.numpy().astype(np.float32, copy=False)
    if qtype == T.F16:
        return w.to(torch.float16).numpy()
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return quantize_k(w, qtype.name)
    # BF16, Q8_0, Q4_0, Q5_0, Q5_1: gguf's own quantizers, on row chunks of ~4M values: on a whole tensor they hold
    # several fp32 temporaries of its size (export peak RSS of an 888 MiB bf16 Llama: 2329 → 705 MiB, measured with
    # bench/gguf_memory.py)
    rows = max(1, (1 << 22) // max(1, w.shape[-1]))
    arr = w.numpy()
    return np.concatenate([gguf_quants.quantize(arr[i : i + rows], qtype) for i in range(0, arr.shape[0], rows)])


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """The NF4 (double quant, blocks of 64) dequantized copy of ``w`` that QLoRA training saw."""
    return dense_weight(quantize_4bit(w.contiguous(), double_quant=True), torch.float32)


def export_gguf(
    base: str,
    adapter: PeftAdapter | None,
    out_path: Path,
    *,
    quant: str = "Q4_K_M",
    onto: str = "original",
    progress: Callable[[str], None] | None = None,
    tokenizer=None,
) -> GGUFExport:
    """Merge ``adapter`` (a PEFT LoRA read by `read_peft`; None = the base alone) into ``base`` and write GGUF.

    ``onto="dequantized"`` merges into the NF4-dequantized decoder linears (the weights QLoRA training used);
    ``"original"`` into the base as stored. Every check (architecture, tokenizer, quant name) runs before any work.
    ``tokenizer``: the base's tokenizer when the caller has it loaded already (else it is loaded from ``base``).
    """
    from transformers import AutoConfig

    if quant not in FILE_TYPES:
        raise SlimtuneError(f"--quant {quant}: choose one of {', '.join(FILE_TYPES)}")
    if onto not in ONTO:
        raise SlimtuneError(f"--onto {onto}: choose one of {', '.join(ONTO)}")
    t0 = time.perf_counter()
    folder, extra = resolve_base(base)
    config = AutoConfig.from_pretrained(str(folder), **extra)
    arch = check_writable(config)
    tok = tokenizer if tokenizer is not None else load_tokenizer(ModelConfig(name=base))
    source_gguf = folder / extra["gguf_file"] if extra else None
    n_layer = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    gguf_arch = next(a for a in MODEL_ARCH_NAMES if MODEL_ARCH_NAMES[a] == arch)
    name_map = get_tensor_name_map(gguf_arch, n_layer)
    qk = {"attn_q": heads, "attn_k": kv_heads} if arch in PERMUTED_ARCHS else {}
    tensors: BaseTensors = (
        open_gguf_base(source_gguf, qk_heads=qk) if source_gguf is not None
        else open_safetensors_base(folder, name_map, tied=tied)
    )
    if tied:
        tensors.shapes.pop("output.weight", None)
    facts = tokenizer_facts(tok, config, tensors.gguf_fields)
    extras = {k: v for k, v in extra_tensors(config).items() if k not in tensors.shapes}
    deltas, replaced = _adapter_by_gguf_name(adapter, name_map, tensors.shapes)
    linear_names = _decoder_linears(tensors.shapes)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(out_path), arch)
    add_arch_metadata(w, config, arch, name=out_path.stem)
    w.add_file_type(int(FILE_TYPES[quant][1]))
    w.add_quantization_version(2)
    add_tokenizer(w, facts)
    plan: list[tuple[str, T]] = []
    result = GGUFExport(path=out_path, quant=quant, arch=arch, onto=onto)
    for name, t in extras.items():  # computed here, stored fp32 as llama.cpp expects (rope_freqs)
        plan.append((name, T.F32))
        w.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), nbytes(tuple(t.shape), T.F32), raw_dtype=T.F32)
        result.types["F32"] = result.types.get("F32", 0) + 1
    for name in iter_layer_order(tensors.shapes):
        shape = tensors.shapes[name]
        qtype = tensor_type(name, shape, quant, n_layer=n_layer, tied=tied)
        plan.append((name, qtype))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
        result.types[qtype.name] = result.types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, qtype) in enumerate(plan):
        if name in extras:
            t = extras[name]
        elif name in replaced:
            t = replaced[name].to(torch.float32)
        else:
            t = tensors.get(name)
        if onto == "dequantized" and name in linear_names and name not in tensors.stored_4bit:
            t = nf4_roundtrip(t)  # (a pre-quantized base's 4-bit weights come dequantized already)
        if name in deltas:
            t = deltas[name].apply(t)
        kind = name.rsplit(".", 2)[-2] if name.startswith("blk.") else ""
        if kind in qk:
            t = permute_qk(t, qk[kind])
        w.write_tensor_data(encode(t.contiguous(), qtype))
        del t
        if progress is not None:
            progress(f"{i + 1}/{len(plan)} {name} {qtype.name}")
    w.close()
    result.seconds = time.perf_counter() - t0
    return result


def _decoder_linears(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The 2-D weights inside decoder blocks (the ones QLoRA stores in NF4)."""
    return {n for n, s in shapes.items() if n.startswith("blk.") and n.endswith(".weight") and len(s) == 2}


def _adapter_by_gguf_name(adapter: PeftAdapter | None, name_map, shapes):
    if adapter is None:
        return {}, {}
    deltas = {}
    for mod, d in adapter.deltas.items():
        g = hf_to_gguf_name(name_map, mod + ".weight")
        if g is None or g not in shapes:
            raise SlimtuneError(f"adapter module {mod} has no tensor in the base (llama.cpp name {g})")
        if tuple(shapes[g]) != (d.B.shape[0], d.A.shape[1]):
            raise SlimtuneError(f"adapter module {mod}: shape {(d.B.shape[0], d.A.shape[1])} ≠ base {shapes[g]}")
        deltas[g] = d
    replaced = {}
    for hf, t in adapter.saved.items():
        g = hf_to_gguf_name(name_map, hf)
        if g is None or g not in shapes:
            if hf == "lm_head.weight":  # a tied model: the embedding carries it
                continue
            raise SlimtuneError(f"adapter saved module {hf} has no tensor in the base")
        replaced[g] = t
    return deltas, replaced
