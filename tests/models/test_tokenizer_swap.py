"""Tokenizer swap: new-token embeddings from old-token embeddings, offline with two locally trained tokenizers."""

import pytest
import torch
from transformers import LlamaForCausalLM

from slimtune.models.tiny import tiny_llama_config, train_tiny_tokenizer, udhr_texts
from slimtune.models.tokenizer_swap import build_mapping, swap_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    old = train_tiny_tokenizer(udhr_texts("eng") + udhr_texts("ita"), vocab_size=400)
    new = train_tiny_tokenizer(udhr_texts("nld"), vocab_size=600)
    return old, new


def _model(vocab, tied=False, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, tie_word_embeddings=tied))


def test_mapping_keeps_shared_tokens_and_averages_the_rest(tokenizers):
    old, new = tokenizers
    m = build_mapping(old, new)
    counts = m.counts()
    assert len(m.sources) == len(new) and counts["same"] > 50 and counts["pieces"] > 50
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    for piece, j in new_vocab.items():
        if piece in old_vocab:
            assert m.sources[j] == [old_vocab[piece]] and m.how[j] == "same"
    j = next(j for j, h in enumerate(m.how) if h == "pieces" and len(m.sources[j]) > 1)
    text = new.convert_tokens_to_string([new.convert_ids_to_tokens(j)])
    assert m.sources[j] == old(text, add_special_tokens=False)["input_ids"]
    assert sum(m.weights[j]) == pytest.approx(1.0)


@pytest.mark.parametrize("tied", [False, True])
def test_swap_resizes_and_initialises_embeddings(tokenizers, tied):
    old, new = tokenizers
    model = _model(len(old), tied=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    report = swap_tokenizer(model, old, new)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == (len(new), 64) and head.shape == (len(new), 64) and model.config.vocab_size == len(new)
    assert report["new_vocab"] == len(new) and report["tied"] == tied
    assert (head is emb) == tied
    m = build_mapping(old, new)
    for j, (src, w) in enumerate(zip(m.sources, m.weights)):
        if m.how[j] in ("same", "role"):
            torch.testing.assert_close(emb[j], old_in[src[0]])
            if not tied:
                torch.testing.assert_close(head[j], old_out[src[0]])
        elif m.how[j] == "pieces":
            expect = sum(wi * old_in[i] for i, wi in zip(src, w))
            torch.testing.assert_close(emb[j], expect, rtol=1e-5, atol=1e-6)
    ids = new("Alle mensen worden vrij geboren.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_length_weighting(tokenizers):
    old, new = tokenizers
    m = build_mapping(old, new, weighting="length")
    j = next(j for j, h in enumerate(m.how) if h == "pieces" and len(m.sources[j]) > 1)
    lens = [len(old.convert_tokens_to_string([old.convert_ids_to_tokens(i)])) for i in m.sources[j]]
    assert m.weights[j] == pytest.approx([n / sum(lens) for n in lens])
    with pytest.raises(ValueError, match="weighting"):
        build_mapping(old, new, weighting="max")


def test_recipe_option_loads_the_new_tokenizer(tmp_path, tokenizers):
    from slimtune.models.load import ModelConfig, QuantConfig, load_model

    old, new = tokenizers
    model = _model(len(old))
    model.save_pretrained(tmp_path / "base")
    old.save_pretrained(tmp_path / "base")
    new.save_pretrained(tmp_path / "dutch_tok")
    cfg = ModelConfig(name=str(tmp_path / "base"), tokenizer_swap=str(tmp_path / "dutch_tok"))
    loaded = load_model(cfg, QuantConfig(mode="nf4"), device="cpu")
    assert len(loaded.tokenizer) == len(new)
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(new)
    again = load_model(cfg, QuantConfig(mode="none"), device="cpu")  # deterministic: a merge rebuilds the same
    torch.testing.assert_close(again.model.get_input_embeddings().weight,
                               loaded.model.get_input_embeddings().weight)


def test_tied_embeddings_trained_in_full_save_and_load(tmp_path, tokenizers):
    """ChocoLlama's modules_to_save on a tied model (SmolLM2, Qwen2.5-3B): embed_tokens and lm_head are one tensor."""
    from slimtune.adapters.export import export_peft, load_native, save_native
    from slimtune.adapters.inject import inject
    from slimtune.adapters.lora import LoRAConfig

    old, new = tokenizers
    model = _model(len(old), tied=True)
    swap_tokenizer(model, old, new)
    inject(model, LoRAConfig(kind="lora", rank=4, modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    save_native(model, tmp_path / "native")
    export_peft(model, tmp_path / "peft")
    other = _model(len(old), tied=True)
    swap_tokenizer(other, old, new)
    load_native(other, tmp_path / "native")
    torch.testing.assert_close(other.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert other.get_output_embeddings().weight is other.get_input_embeddings().weight
