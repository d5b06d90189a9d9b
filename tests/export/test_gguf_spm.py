"""GGUF export of SentencePiece-style (byte-fallback BPE) tokenizers and of llama3 RoPE scaling, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from slimtune.export.gguf_export import export_gguf
from slimtune.models.tiny import tiny_tokenizer

UDHR = Path(__file__).resolve().parents[2] / "recipes" / "data" / "udhr"
SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False)


def _texts(lang: str) -> list[str]:
    return [json.loads(line)["text"] for line in (UDHR / f"{lang}.jsonl").read_text().splitlines() if line.strip()]


def _llama2_style_tokenizer() -> LlamaTokenizer:
    """A Llama-2-layout tokenizer trained here: <unk> <s> </s>, 256 <0xXX> byte tokens, then BPE pieces."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False)
    trainer_tok.train_from_iterator(_texts("eng") + _texts("spa"), trainer)  # no Urdu: its letters fall back to bytes
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as Llama-2 and Mistral do
    tok.add_tokens(["<|user|>"])  # a user-defined added token
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    return tok


def _save_tiny_llama(folder: Path, tok, **rope) -> AutoModelForCausalLM:
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES,
                      **rope)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    tok = _llama2_style_tokenizer()
    model = _save_tiny_llama(tmp_path / "base", tok)
    out = export_gguf(str(tmp_path / "base"), None, tmp_path / "spm.gguf", quant="F16")
    r = GGUFReader(str(out.path))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    vocab = tok.get_vocab()
    assert types[vocab["<unk>"]] == TokenType.UNKNOWN
    assert types[vocab["<s>"]] == types[vocab["</s>"]] == types[vocab["<|end|>"]] == TokenType.CONTROL
    assert types[vocab["<|user|>"]] == TokenType.USER_DEFINED
    assert all(types[3 + b] == TokenType.BYTE and tokens[3 + b] == f"<0x{b:02X}>" for b in range(256))
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert "<|user|>" in r.fields["tokenizer.chat_template"].contents()
    assert scores[vocab["▁the"]] > scores[vocab["t"]]  # merged pieces outrank base characters
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    first = {lang: _texts(lang)[1][:400] for lang in ("eng", "spa", "cat", "urd", "swh")}
    sentences = [*first.values(), "<|user|>Everyone has the right<|end|> ünïcödé ✓\n\ttabs  and  spaces"]
    for s in sentences:
        assert back_tok(s)["input_ids"] == tok(s)["input_ids"], s
    assert any(3 <= i < 259 for i in tok(first["urd"])["input_ids"])  # Urdu really went through byte fallback
    ids = torch.tensor([tok(sentences[0])["input_ids"][:24]])
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="spm.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2


def test_llama3_rope_freqs_tensor(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tok = tiny_tokenizer()
    model = _save_tiny_llama(tmp_path / "base", tok, rope_parameters=rope)
    out = export_gguf(str(tmp_path / "base"), None, tmp_path / "l3.gguf", quant="Q8_0")
    t = {x.name: x for x in GGUFReader(str(out.path)).tensors}["rope_freqs.weight"]
    assert t.tensor_type.name == "F32"
    got = np.asarray(t.data, dtype=np.float64)
    # reference: transformers' own llama3 inverse frequencies against the unscaled ones
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    want = (plain / scaled.double()).numpy()
    assert got.shape == (8,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() == pytest.approx(1.0) and got.max() == pytest.approx(8.0) and len(set(got.round(4))) > 2
