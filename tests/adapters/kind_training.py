"""Shared checks for the paper adapter kinds (NOLA, DyLoRA, SoRA, ...): the shipped CPU recipe trains end to end on a
tiny NF4 model through the fused path (loss falls), resume is exact, the fused ops equal the unfused module, the
parameter count and the estimate run. Importable because pytest puts this folder on sys.path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.config.recipe import load_recipe
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.train.loop import Trainer, causal_lm_loss_sum

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))  # token ids of the tiny_base tests


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize_b(adapters, seed=1):
    """B (zero at init) set to small random values, so the update and every gradient are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)


def tiny_loaded(quant: str = "nf4", layers: int = 2):
    """The tiny Llama with the tiny tokenizer, NF4 by default (the recipes' quant)."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=layers))
    return prepare_loaded(model, tok, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny")


def recipe(name: str, run_dir: Path, *overrides: str):
    """The shipped recipe ``recipes/<name>.yaml`` with the run folder moved and ``overrides`` applied."""
    return load_recipe(RECIPES / f"{name}.yaml", [f"output.dir={run_dir}", "output.export_peft=false", *overrides])


def trainer(name: str, run_dir: Path, *overrides: str, quant: str = "nf4") -> Trainer:
    t = Trainer(recipe(name, run_dir, *overrides), run_dir, base_dir=RECIPES, loaded=tiny_loaded(quant))
    t.setup()
    return t


def batch_loss(t: Trainer, batch) -> float:
    with torch.no_grad():
        return float(causal_lm_loss_sum(t.model, batch))


def check_recipe_trains(name: str, tmp_path: Path, *, factor: float = 0.97) -> Trainer:
    """The recipe's own settings on the tiny NF4 model: every decoder module fused, the loss on a fixed batch falls."""
    t = trainer(name, tmp_path)
    assert t.fuse_report is not None and t.fuse_report.fully_fused, t.fuse_report
    batch = next(iter(t.data.batches(4, epoch=0)))
    t.model.eval()
    before = batch_loss(t, batch)
    t.train()
    t.model.eval()
    after = batch_loss(t, batch)
    assert after < factor * before, (before, after)
    return t


def adapter_tensors(t: Trainer) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers, not the base layer's), by full name."""
    return {f"{m}.{n}": v.detach().clone() for m, a in t.adapters.items() for n, v in a.state_dict().items()
            if not n.startswith("base_layer.")}


def check_resume_is_exact(name: str, tmp_path: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """4 steps straight equal 2 steps, a checkpoint, a fresh Trainer resuming, 2 more steps (bit for bit)."""
    common = ("train.steps=4", "train.save_every=2", *overrides)
    straight = trainer(name, tmp_path / "a", *common)
    straight.train()
    want = adapter_tensors(straight)
    assert want
    first = trainer(name, tmp_path / "b", *common)
    first.train(stop_after=2)
    second = trainer(name, tmp_path / "b", *common)
    assert second.resume() and second.pos.step == 2
    second.train()
    got = adapter_tensors(second)
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert torch.equal(got[n], w), n
    assert [h.loss for h in second.history] == [h.loss for h in straight.history[2:]]
    return want


def check_fused_equals_unfused(model_fn, inject_fn, *, ids=None) -> None:
    """Loss and every adapter gradient through the fused decoder equal the plain HF modules (fp32 tiny model)."""
    from slimtune.adapters.inject import adapters_of
    from slimtune.models.fused import causal_lm_loss, fuse_model

    ids = ids if ids is not None else torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = model_fn()
        inject_fn(model)
        model.train()
        if fused:
            report = fuse_model(model)
            assert report.fully_fused, report
        loss = causal_lm_loss(model, input_ids=ids, labels=ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results.append((loss.detach(), grads, adapters_of(model)))
    (l0, g0, _), (l1, g1, _) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def estimate_json(name: str) -> dict:
    """`slimtune estimate recipes/<name>.yaml --json` (the shipped recipe, from its model config: no weights). The
    model is named by its built-in config (the same SmolLM2-135M shapes): reading them from the recipe's GGUF parses
    its whole vocabulary (~10 s on CPU)."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    res = CliRunner().invoke(app, ["estimate", str(RECIPES / f"{name}.yaml"), "--json",
                                   "--set", "model.name=SmolLM2-135M-Instruct"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)
