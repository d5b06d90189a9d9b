import math

import pytest
import torch
import transformers

from slimtune.eval.perplexity import perplexity, windows
from slimtune.models.tiny import tiny_llama_config, train_tiny_tokenizer, udhr_texts


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(udhr_texts("eng") + udhr_texts("src"))


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))


def test_windows_score_every_token_once():
    ids = list(range(10))
    ws = windows(ids, 4)
    assert ws == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [t for w in ws for t in w[1:]] == ids[1:]
    assert windows(ids, 10) == [ids] and windows([5], 4) == []
    assert [t for w in windows(list(range(11)), 4) for t in w[1:]] == list(range(1, 11))


def test_single_text_matches_model_loss(tok):
    model = _model(tok)
    text = udhr_texts("eng")[1]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    r = perplexity(model, tok, [text], max_seq_len=4096)
    assert r["tokens"] == ids.shape[1] - 1
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_batched_windows_match_hand_computation(tok):
    model = _model(tok)
    texts = udhr_texts("src")[:5]
    max_len = 48
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            for w in windows(tok(text)["input_ids"], max_len):
                ids = torch.tensor([w])
                # model(labels=...) averages over the len(w) - 1 shifted targets: weight it back by that count
                total += model(input_ids=ids, labels=ids).loss.item() * (len(w) - 1)
                count += len(w) - 1
    expected = total / count
    assert count == sum(len(tok(t)["input_ids"]) - 1 for t in texts)
    for bs in (1, 3):
        r = perplexity(model, tok, texts, max_seq_len=max_len, batch_size=bs)
        assert r["tokens"] == count
        assert r["nll"] == pytest.approx(expected, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_mode_restored_and_no_grad(tok):
    model = _model(tok)
    model.train()
    perplexity(model, tok, ["Article 1. All human beings"], max_seq_len=16)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    perplexity(model, tok, ["Article 1. All human beings"], max_seq_len=16)
    assert not model.training
    with pytest.raises(ValueError):
        perplexity(model, tok, [""], max_seq_len=16)


def test_training_on_a_text_lowers_its_perplexity(tok):
    model = _model(tok)
    text = udhr_texts("src")[1]
    before = perplexity(model, tok, [text], max_seq_len=256)["ppl"]
    ids = torch.tensor([tok(text)["input_ids"][:256]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    after = perplexity(model, tok, [text], max_seq_len=256)["ppl"]
    assert after < 0.5 * before
