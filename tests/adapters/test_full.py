"""Full fine-tuning (adapter.kind: full): what trains, the loss falls, resume is exact, the output folder loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtune.adapters.full import FullConfig, select_trainable
from slimtune.config.recipe import Recipe
from slimtune.errors import RecipeError
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train.loop import Trainer, causal_lm_loss_sum


def tiny_model(tie: bool = False, quant: str = "none"):
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=tie))
    return prepare_loaded(model, tok, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny")


def recipe(run_dir: Path, *, steps: int = 4, modules="no-embeddings", **train) -> Recipe:
    return Recipe.model_validate({
        "model": {"name": "tiny"}, "quant": {"mode": "none"},
        "adapter": {"kind": "full", "modules": modules},
        "data": {"format": "text", "max_seq_len": 32, "sources": [{"path": str(udhr_path("eng")), "max_records": 8}]},
        "train": {"lr": 1e-3, "steps": steps, "micro_batch": 2, "warmup": 0, "schedule": "constant", "seed": 3,
                  "fused": False, **train},
        "output": {"dir": str(run_dir), "export_peft": False, "merged_dtype": "float32"},
    })


def test_module_selection():
    m = tiny_model().model
    names = select_trainable(m, FullConfig(modules="all-linear"))
    assert names and all(n.endswith("_proj.weight") for n in names)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(names)
    names = select_trainable(m, FullConfig(modules="no-embeddings"))
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names and "model.norm.weight" in names
    tied = tiny_model(tie=True).model
    assert not any("embed" in n or "lm_head" in n for n in select_trainable(tied, FullConfig()))
    assert len(select_trainable(m, FullConfig(modules="all"))) == len(list(m.parameters()))
    only = select_trainable(m, FullConfig(modules=["q_proj", "re:layers\\.1\\..*norm"]))
    assert len(only) == 2 + 2  # q_proj of 2 layers + layer 1's two norms
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(m, FullConfig(modules=["nope"]))
    with pytest.raises(ValueError, match="quant.mode: none"):
        select_trainable(tiny_model(quant="nf4").model, FullConfig(modules="all-linear"))


def test_nf4_base_is_a_recipe_error(tmp_path):
    t = Trainer(recipe(tmp_path), tmp_path, loaded=tiny_model(quant="nf4"))
    with pytest.raises(RecipeError, match="dense base"):
        t.setup()


def test_loss_falls_and_the_output_folder_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    t = Trainer(recipe(tmp_path, steps=6), tmp_path, loaded=tiny_model())
    t.setup()
    assert t.trainable == "model" and not t.adapters
    batch = next(iter(t.data.batches(4, epoch=0)))
    with torch.no_grad():
        before = float(causal_lm_loss_sum(t.model, batch))
    t.train()
    t.model.eval()
    with torch.no_grad():
        after = float(causal_lm_loss_sum(t.model, batch))
        trained_logits = t.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert after < 0.95 * before  # measured: 777 → 734 (summed over the batch tokens)
    out = t.save_outputs()
    assert out["adapter_native"] is None
    loaded = AutoModelForCausalLM.from_pretrained(out["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, trained_logits, rtol=1e-5, atol=1e-5)
    assert (Path(out["merged"]) / "tokenizer.json").is_file()


def test_resume_is_exact(tmp_path):
    straight = Trainer(recipe(tmp_path / "a"), tmp_path / "a", loaded=tiny_model())
    straight.setup()
    straight.train()
    want = {n: p.detach().clone() for n, p in straight.model.named_parameters()}

    first = Trainer(recipe(tmp_path / "b", save_every=2), tmp_path / "b", loaded=tiny_model())
    first.setup()
    first.train(stop_after=2)
    second = Trainer(recipe(tmp_path / "b", save_every=2), tmp_path / "b", loaded=tiny_model())
    second.setup()
    assert second.resume() and second.pos.step == 2
    second.train()
    got = dict(second.model.named_parameters())
    for n, w in want.items():
        assert torch.equal(got[n].detach(), w), n
