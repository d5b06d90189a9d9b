"""The training loop: loss goes down, accumulation is exact, stop + resume reproduces an uninterrupted run."""

import json

import pytest
import torch

from slimtune.config.recipe import load_recipe_dict
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train.loop import Trainer


def make_recipe(tmp_path, records=None, **train):
    src = {"path": str(udhr_path("src"))} if records is None else {"path": str(udhr_path("src")), "max_records": records}
    data = {
        "name": "t",
        "model": {"name": "tiny-llama"},
        "quant": {"mode": train.pop("quant", "none")},
        "adapter": {"kind": train.pop("kind", "lora"), "rank": 4, "alpha": 8},
        "data": {"sources": [src], "format": "text", "max_seq_len": 32},
        "train": {"lr": 5e-3, "steps": 6, "micro_batch": 2, "warmup": 0, "seed": 3, "fused": False, **train},
        "output": {"dir": str(tmp_path / "run")},
    }
    return load_recipe_dict(data)


def make_loaded(quant="none", seed=0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    return prepare_loaded(model, tok, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny")


def trainer(tmp_path, recipe, loaded=None):
    t = Trainer(recipe, run_dir=tmp_path / "run", loaded=loaded or make_loaded(recipe.quant.mode))
    t.setup()
    return t


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_loss_decreases(tmp_path, quant):
    r = make_recipe(tmp_path, records=2, steps=12, quant=quant, lr=5e-2, micro_batch=4)
    t = trainer(tmp_path, r)
    summary = t.train()
    losses = [h.loss for h in t.history]
    assert len(losses) == 12 and summary["steps"] == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def _grads_of_first_step(tmp_path, micro_batch, grad_accum):
    r = make_recipe(tmp_path, micro_batch=micro_batch, grad_accum=grad_accum, max_grad_norm=0, steps=1)
    t = trainer(tmp_path, r)
    captured = {}
    orig = t.optimizer.step

    def step(*a, **k):
        for n, p in t.model.named_parameters():
            if p.grad is not None:
                captured[n] = p.grad.clone()
        return orig(*a, **k)

    t.optimizer.step = step
    t.train()
    return captured


def test_grad_accumulation_equals_big_batch(tmp_path):
    g_big = _grads_of_first_step(tmp_path / "a", 4, 1)
    g_acc = _grads_of_first_step(tmp_path / "b", 1, 4)
    assert g_big.keys() == g_acc.keys() and g_big
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_stop_and_resume_is_exact(tmp_path, kind):
    full = trainer(tmp_path / "full", make_recipe(tmp_path / "full", kind=kind, grad_accum=2))
    full.train()
    ref = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}

    r = make_recipe(tmp_path / "part", kind=kind, grad_accum=2)
    part = trainer(tmp_path / "part", r)
    s = part.train(stop_after=3)
    assert s["interrupted"] and s["steps"] == 3
    resumed = trainer(tmp_path / "part", r)
    assert resumed.resume()
    assert resumed.pos.step == 3
    resumed.train()
    assert _losses(tmp_path / "part" / "run") == _losses(tmp_path / "full" / "run")
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref[n]), n


def test_resume_refuses_changed_recipe(tmp_path):
    from slimtune.errors import RecipeError

    r = make_recipe(tmp_path)
    t = trainer(tmp_path, r)
    t.train(stop_after=2)
    changed = make_recipe(tmp_path, micro_batch=4)
    t2 = trainer(tmp_path, changed)
    with pytest.raises(RecipeError, match="train.micro_batch"):
        t2.resume()


def test_fused_run_reports_the_kernel_choices(tmp_path):
    """The fuse report is followed, after the first step, by what `train.kernels` chose for the fused ops."""
    r = make_recipe(tmp_path, records=2, steps=2, fused=True)
    logged: list[str] = []
    t = Trainer(r, run_dir=tmp_path / "run", loaded=make_loaded())
    t.reporter.log = logged.append
    t.setup()
    summary = t.train()
    kernels = [line for line in logged if line.startswith("kernels: ")]
    assert kernels == ["kernels: auto on cpu: the torch reference for every op (candidates are measured on CUDA only)"]
    assert summary["kernels"] == [] and summary["fused"]
