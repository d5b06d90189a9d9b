"""The Trainer with the memory-floor switches: train.embeddings_on: cpu, adapter_dtype: bfloat16, optimizer_on: cpu."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.config.recipe import load_recipe_dict
from slimtune.errors import RecipeError
from slimtune.models.embeddings import HostEmbedding
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train.loop import Trainer
from slimtune.train.optim import MasterWeights


def _recipe(tmp_path, **train):
    return load_recipe_dict({
        "name": "t", "model": {"name": "tiny-llama"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 2}], "format": "text",
                 "max_seq_len": 32},
        "train": {"lr": 5e-2, "steps": 6, "micro_batch": 4, "warmup": 0, "seed": 3, "grad_accum": 1, **train},
        "output": {"dir": str(tmp_path / "run")},
    })


def _trainer(tmp_path, recipe, tie=False):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=tie))
    loaded = prepare_loaded(model, tok, QuantConfig(mode="nf4"), device=torch.device("cpu"), source="tiny")
    t = Trainer(recipe, run_dir=tmp_path / "run", loaded=loaded, handle_signals=False)
    t.setup()
    return t


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_all_switches_on_train_and_resume_exactly(tmp_path):
    train = dict(embeddings_on="cpu", adapter_dtype="bfloat16", optimizer_on="cpu")
    full = _trainer(tmp_path / "full", _recipe(tmp_path / "full", **train))
    assert isinstance(full.model.get_input_embeddings(), HostEmbedding)
    assert isinstance(full.optimizer, MasterWeights)
    trained = [p for p in full.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    full.train()
    losses = [h.loss for h in full.history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    ref = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}

    r = _recipe(tmp_path / "part", **train)
    part = _trainer(tmp_path / "part", r)
    assert part.train(stop_after=3)["interrupted"]
    resumed = _trainer(tmp_path / "part", r)
    assert resumed.resume() and resumed.pos.step == 3
    resumed.train()
    assert _losses(tmp_path / "part" / "run") == _losses(tmp_path / "full" / "run")
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref[n]), n


def test_embeddings_on_cpu_refuses_a_tied_dense_head(tmp_path):
    with pytest.raises(RecipeError, match="embeddings_on: cpu: lm_head is tied"):
        _trainer(tmp_path, _recipe(tmp_path, embeddings_on="cpu"), tie=True)
