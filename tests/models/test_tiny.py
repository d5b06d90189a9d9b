"""The shared tiny-model helpers: offline tokenizer, tiny configs, UDHR data location."""

import pytest
import torch

from slimtune.errors import DataError
from slimtune.models.tiny import (
    TINY_EOS_ID,
    TINY_IM_START_ID,
    TINY_PAD_ID,
    UDHR_LANGS,
    shared_data_dir,
    tiny_llama_config,
    tiny_qwen2_config,
    tiny_tokenizer,
    train_tiny_tokenizer,
    udhr_records,
    udhr_texts,
)


def test_udhr_texts_align_across_languages():
    for lang in UDHR_LANGS:
        texts = udhr_texts(lang)
        assert len(texts) == 31 and all(isinstance(t, str) and t for t in texts)
    assert [r["article"] for r in udhr_records("src")] == [r["article"] for r in udhr_records("eng")]
    with pytest.raises(DataError, match="xyz"):
        udhr_texts("xyz")


def test_shared_data_env_override(monkeypatch, tmp_path):
    real = shared_data_dir()
    monkeypatch.setenv("SLIMTUNE_SHARED_DATA", str(real.parent))  # the shared/ folder works too
    assert shared_data_dir() == real.parent / "data"
    (tmp_path / "udhr").mkdir()
    monkeypatch.setenv("SLIMTUNE_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_train_tiny_tokenizer_fast_and_chatml():
    texts = udhr_texts("eng") + udhr_texts("src")
    tok = train_tiny_tokenizer(texts, vocab_size=400)
    assert len(tok) == 400
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", TINY_EOS_ID)
    assert tok.pad_token_id == TINY_PAD_ID
    assert tok.convert_tokens_to_ids("<|im_start|>") == TINY_IM_START_ID
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    # byte-level: any text round-trips, including scripts it saw little of
    s = "Totu sos èsseres umanos — تمام انسان 🙂"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    # special tokens are single tokens
    assert tok("<|im_start|>x<|im_end|>", add_special_tokens=False)["input_ids"][0] == TINY_IM_START_ID


@pytest.mark.parametrize("make", [tiny_llama_config, tiny_qwen2_config])
def test_tiny_configs_build_and_run(make):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = make(vocab_size=len(tok), num_hidden_layers=1)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        64, 136, 4, 2)
    assert cfg.num_hidden_layers == 1 and cfg.tie_word_embeddings is False and cfg.vocab_size == len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.tensor([tok("Tutti gli esseri umani", add_special_tokens=False)["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)


def test_tiny_config_of_every_family():
    """``tiny_config`` builds the 2-layer test model of any registered family (its spec's overrides applied, the
    layer-type pattern stretched to the layer count) and refuses an unknown model_type."""
    import transformers

    from slimtune.models.arch import all_specs
    from slimtune.models.tiny import tiny_config

    for model_type, spec in all_specs().items():
        cfg = tiny_config(model_type, num_hidden_layers=3)
        geo = spec.geometry(cfg)
        assert (geo.hidden, geo.layers, geo.heads, geo.kv_heads, geo.head_dim) == (64, 3, 4, 2, 16), model_type
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        assert len(spec.decoder_layers(model)) == 3
    with pytest.raises(ValueError, match="no family for model_type 'gpt2'"):
        tiny_config("gpt2")
