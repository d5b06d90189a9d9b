"""Model configs without downloads: a built-in table of published configs, resolution, exact parameter counts.

`resolve_model_config(name_or_path)` turns what a recipe names as `model` into a transformers config:

1. a local folder holding `config.json` (or a single `.gguf` file), a `config.json` path, or a `.gguf` file;
2. a hub id whose `config.json` is already in the local Hugging Face cache (never the network);
3. the built-in table below (case-insensitive; the org prefix is ignored: "meta-llama/Llama-3.1-8B" ==
   "llama-3.1-8b");
4. otherwise a `ModelError` naming the id and the known names.

The table holds the values of each model's published `config.json` (structure, RoPE, special tokens). The
sliding-window fields of the Qwen2.5 configs are left out: `use_sliding_window` is false in all of them, so they
change nothing (transformers then sets `sliding_window=None` and every layer to full attention).

`parameter_counts(config)` counts every parameter of the decoder-only models slimtune trains (every family with an
``ArchSpec``: shapes, biases and norms come from it) exactly; tests check it against models built on the meta device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimtune.errors import ModelError
from slimtune.models.arch import all_specs, known_model_types, spec_for

# --------------------------------------------------------------------------------------------------------------
# Published configs (values as in each repository's config.json)
# --------------------------------------------------------------------------------------------------------------

_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
}

_QWEN2_COMMON = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

LLAMA_3_1_8B = {
    **_LLAMA_COMMON,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA31_ROPE,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

LLAMA_3_1_70B = {
    **LLAMA_3_1_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

LLAMA_2_7B = {
    **_LLAMA_COMMON,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

QWEN2_5_0_5B = {
    **_QWEN2_COMMON,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}

QWEN2_5_3B = {
    **_QWEN2_COMMON,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}

QWEN2_5_7B = {
    **_QWEN2_COMMON,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}

SMOLLM2_135M = {
    **_LLAMA_COMMON,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "initializer_range": 0.041666666666666664,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 0,
}

_QWEN_INSTRUCT = {"eos_token_id": 151645}

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

GEMMA_2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

PHI_3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}

#: Canonical name -> config.json values. Keys are the repository names as published (without the org).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3.1-8B": LLAMA_3_1_8B,
    "Llama-3.1-8B-Instruct": {**LLAMA_3_1_8B, "eos_token_id": [128001, 128008, 128009]},
    "Llama-3.1-70B": LLAMA_3_1_70B,
    "Llama-3.1-70B-Instruct": {**LLAMA_3_1_70B, "eos_token_id": [128001, 128008, 128009]},
    "Llama-2-7b-hf": LLAMA_2_7B,
    "Llama-2-7b-chat-hf": LLAMA_2_7B,
    "Qwen2.5-0.5B": QWEN2_5_0_5B,
    "Qwen2.5-0.5B-Instruct": {**QWEN2_5_0_5B, **_QWEN_INSTRUCT},
    "Qwen2.5-3B": QWEN2_5_3B,
    "Qwen2.5-3B-Instruct": {**QWEN2_5_3B, **_QWEN_INSTRUCT},
    "Qwen2.5-7B": QWEN2_5_7B,
    "Qwen2.5-7B-Instruct": {**QWEN2_5_7B, **_QWEN_INSTRUCT, "max_position_embeddings": 32768},
    "SmolLM2-135M": SMOLLM2_135M,
    "Qwen3-8B": QWEN3_8B,
    "gemma-2-2b": GEMMA_2_2B,
    "Phi-3-mini-4k-instruct": PHI_3_MINI_4K,
    "SmolLM2-135M-Instruct": {**SMOLLM2_135M, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
}

#: Other spellings people use for the same repositories (lower case, no org).
_ALIASES = {
    "meta-llama-3.1-8b": "Llama-3.1-8B",
    "meta-llama-3.1-8b-instruct": "Llama-3.1-8B-Instruct",
    "meta-llama-3.1-70b": "Llama-3.1-70B",
    "meta-llama-3.1-70b-instruct": "Llama-3.1-70B-Instruct",
    "llama-2-7b": "Llama-2-7b-hf",
    "llama-2-7b-chat": "Llama-2-7b-chat-hf",
}

_BY_KEY = {name.lower(): name for name in BUILTIN_CONFIGS} | _ALIASES


def known_model_names() -> list[str]:
    """The names the built-in table answers to (canonical spelling)."""
    return sorted(BUILTIN_CONFIGS)


def builtin_config_dict(name: str) -> dict[str, Any] | None:
    """The published config.json values for `name` (org prefix and case ignored), or None."""
    key = name.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    canonical = _BY_KEY.get(key)
    return None if canonical is None else json.loads(json.dumps(BUILTIN_CONFIGS[canonical]))


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------


def config_from_dict(values: Mapping[str, Any], *, source: str = "config"):
    """A transformers config of the right class for `values["model_type"]` (legacy RoPE keys are converted)."""
    from transformers import CONFIG_MAPPING

    model_type = values.get("model_type")
    if not model_type:
        raise ModelError(f"{source}: no 'model_type' in the config")
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ModelError(f"{source}: model_type {model_type!r} is not known to transformers") from None
    try:
        return cls.from_dict(dict(values))
    except Exception as err:  # transformers' validation errors are multi-line
        raise ModelError(f"{source}: invalid config ({type(err).__name__}: {err})") from None


def _load_json_config(path: Path):
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read config ({err})") from None
    if not isinstance(values, dict):
        raise ModelError(f"{path}: a config.json must hold a JSON object")
    return config_from_dict(values, source=str(path))


def _gguf_archs() -> dict[str, str]:
    """llama.cpp architecture name -> transformers model_type, from the families' ``gguf_arch`` (the first family
    that claims a name wins: "llama" is Llama, whose layout Mistral checkpoints share)."""
    out: dict[str, str] = {}
    for model_type, spec in all_specs().items():
        out.setdefault(spec.gguf_arch, spec.name)
    out.setdefault("llama", "llama")
    return out


def _gguf_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def config_from_gguf(path: str | os.PathLike):
    """Read a GGUF file's metadata (no tensor data) into a transformers config."""
    path = Path(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
    except Exception as err:
        raise ModelError(f"{path}: cannot read GGUF metadata ({type(err).__name__}: {err})") from None
    arch = _gguf_value(reader, "general.architecture")
    archs = _gguf_archs()
    if arch not in archs:
        known = ", ".join(sorted(archs))
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (known: {known})")

    def need(key: str):
        value = _gguf_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    tensor_names = {t.name for t in reader.tensors}
    vocab = _gguf_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelError(f"{path}: GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
        vocab = len(tokens)
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    values: dict[str, Any] = {
        "model_type": archs[arch],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_value(reader, f"{arch}.attention.head_count_kv") or heads),
        "vocab_size": int(vocab),
        # llama.cpp drops output.weight when the head is tied to the embeddings.
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    optional = {
        "max_position_embeddings": ("context_length", int),
        "rms_norm_eps": ("attention.layer_norm_rms_epsilon", float),
        "rope_theta": ("rope.freq_base", float),
        # Gemma 2/3 (absent elsewhere): the family's extras, as llama.cpp's converter writes them
        "sliding_window": ("attention.sliding_window", int),
        "attn_logit_softcapping": ("attn_logit_softcapping", float),
        "final_logit_softcapping": ("final_logit_softcapping", float),
    }
    for name, (key, cast) in optional.items():
        value = _gguf_value(reader, f"{arch}.{key}")
        if value is not None:
            values[name] = cast(value)
    key_length = _gguf_value(reader, f"{arch}.attention.key_length")
    if key_length is not None and int(key_length) != hidden // heads:
        values["head_dim"] = int(key_length)
    for name, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = _gguf_value(reader, key)
        if value is not None:
            values[name] = int(value)
    return config_from_dict(values, source=str(path))


def _cached_hub_config(repo_id: str):
    """The config.json of `repo_id` if it is already in the local HF cache; never touches the network."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    except Exception:  # an invalid repo id, an unreadable cache: not there
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return _load_json_config(Path(found))
    return None


def resolve_model_config(name_or_path: str | os.PathLike):
    """A transformers config for a local folder / config.json / GGUF file, a cached hub id or a built-in name."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_json_config(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return config_from_gguf(ggufs[0])
        raise ModelError(f"{path}: folder has no config.json" + (" and several .gguf files" if ggufs else ""))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return config_from_gguf(path)
        if path.suffix.lower() == ".json":
            return _load_json_config(path)
        raise ModelError(f"{path}: expected a model folder, a config.json or a .gguf file")
    cached = _cached_hub_config(text)
    if cached is not None:
        return cached
    values = builtin_config_dict(text)
    if values is not None:
        return config_from_dict(values, source=text)
    raise ModelError(
        f"model {text!r}: not a local folder or file, not in the local Hugging Face cache, and not a built-in "
        f"config (known: {', '.join(known_model_names())})"
    )


# --------------------------------------------------------------------------------------------------------------
# Shapes and exact parameter counts (from the family's ArchSpec)
# --------------------------------------------------------------------------------------------------------------


def _spec(config):
    spec = spec_for(config)
    if spec is None:
        raise ModelError(f"model_type {getattr(config, 'model_type', None)!r}: parameter counts cover the registered "
                         f"families only ({', '.join(known_model_types())})")
    return spec


def head_dim(config) -> int:
    return _spec(config).geometry(config).head_dim


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear module in one decoder layer (packed modules as one)."""
    spec = _spec(config)
    return spec.shapes(spec.geometry(config))


def linear_has_bias(config) -> dict[str, bool]:
    """Which linear modules carry a bias (the family's rule, e.g. Qwen2: q/k/v always)."""
    return _spec(config).bias_map(config)


def parameter_counts(config) -> dict[str, Any]:
    """Exact parameter counts by part. Tied embeddings count once (lm_head = 0)."""
    spec = _spec(config)
    geo = spec.geometry(config)
    shapes, bias = spec.shapes(geo), spec.bias_map(config)
    hidden, layers, vocab = geo.hidden, geo.layers, geo.vocab
    per_layer: dict[str, int] = {}
    for name, (out_f, in_f) in shapes.items():
        per_layer[name] = out_f * in_f + (out_f if bias[name] else 0)
    for norm, _ in spec.layer_norms:
        per_layer[norm] = hidden
    if spec.qk_norm:  # per-head RMSNorm on q and k
        per_layer["q_norm"] = per_layer["k_norm"] = geo.head_dim
    linear_weights = sum(o * i for o, i in shapes.values())
    linear_bias = sum(o for name, (o, _) in shapes.items() if bias[name])
    per_layer_total = sum(per_layer.values())
    embed = vocab * hidden
    lm_head = 0 if spec.tied(config) else vocab * hidden
    counts = {
        "embed_tokens": embed,
        "lm_head": lm_head,
        "final_norm": hidden,
        "num_layers": layers,
        "per_layer": per_layer,
        "per_layer_linear_weights": linear_weights,
        "per_layer_bias": linear_bias,
        "per_layer_norms": per_layer_total - linear_weights - linear_bias,
        "per_layer_total": per_layer_total,
        "linear_weights": layers * linear_weights,
        "layers": layers * per_layer_total,
    }
    counts["total"] = embed + lm_head + hidden + layers * per_layer_total
    return counts
