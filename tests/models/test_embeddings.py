"""The host-memory input embedding (train.embeddings_on: cpu): same outputs and gradients, not a parameter, tied
heads refused."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from slimtune.adapters.inject import inject
from slimtune.adapters.lora import LoRAConfig
from slimtune.errors import RecipeError
from slimtune.models.embeddings import HostEmbedding, embeddings_to_host, why_not_on_host
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config


def _model(**overrides):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=97, **overrides))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_same_logits_and_gradients_as_the_embedding_in_place():
    ref = _model()
    host = copy.deepcopy(ref)
    inject(ref, LoRAConfig(rank=4))
    inject(host, LoRAConfig(rank=4))
    host.load_state_dict(ref.state_dict())
    for m in (ref, host):  # nonzero B so that every factor gets a gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.constant_(p, 0.01)
    table = embeddings_to_host(host)
    assert isinstance(host.get_input_embeddings(), HostEmbedding)
    ids = torch.randint(0, 97, (2, 11))
    logits_ref, grads_ref = _loss_and_grads(ref, ids)
    logits_host, grads_host = _loss_and_grads(host, ids)
    assert torch.equal(logits_ref, logits_host)
    assert grads_ref.keys() == grads_host.keys() and len(grads_ref) > 0
    for n in grads_ref:
        assert torch.equal(grads_ref[n], grads_host[n]), n
    assert table.weight.grad is None


def test_table_is_no_parameter_and_stays_on_the_host_but_is_in_the_state_dict():
    m = _model()
    before = m.get_input_embeddings().weight.clone()
    n_params = sum(p.numel() for p in m.parameters())
    embeddings_to_host(m)
    names = dict(m.named_parameters())
    assert "model.embed_tokens.weight" not in names
    assert sum(p.numel() for p in m.parameters()) == n_params - before.numel()
    sd = m.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], before)
    m.to("meta")  # every parameter and buffer moves; the table does not
    assert m.lm_head.weight.is_meta and m.get_input_embeddings().anchor.is_meta
    assert m.get_input_embeddings().weight.device.type == "cpu"
    assert torch.equal(m.get_input_embeddings().weight, before)
    # a state dict loads into the host table
    m2 = _model()
    embeddings_to_host(m2)
    with torch.no_grad():
        m2.get_input_embeddings().weight.zero_()
    m2.load_state_dict(sd)
    assert torch.equal(m2.get_input_embeddings().weight, before)


def test_rows_arrive_on_the_anchor_device_in_the_table_dtype():
    m = _model()
    host = embeddings_to_host(m)
    m.to(torch.float64)  # the anchor follows the model; the table (fp32) does not: rows come in its dtype
    ids = torch.tensor([[1, 2, 3]])
    rows = host(ids)
    assert rows.shape == (1, 3, 64) and rows.dtype == torch.float32 and not rows.requires_grad
    assert torch.equal(rows, host.weight[ids])


def test_tied_head_is_refused_unless_the_head_is_quantized():
    m = _model(tie_word_embeddings=True)
    m.tie_weights()
    why = why_not_on_host(m)
    assert why is not None and "tied" in why
    with pytest.raises(RecipeError, match="train.embeddings_on: cpu: lm_head is tied"):
        embeddings_to_host(m)
    # quantize_lm_head gives the head its own NF4 copy: the table can go, and the logits do not change
    q = prepare_loaded(_model(tie_word_embeddings=True), None, QuantConfig(mode="nf4", quantize_lm_head=True),
                       device=torch.device("cpu"), source="tiny").model
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    embeddings_to_host(q)
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, ref)


def test_trainable_table_is_refused():
    m = _model()
    m.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(RecipeError, match="modules_to_save"):
        embeddings_to_host(m)
