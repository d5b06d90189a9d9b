"""The seed-adapter recipes (LaMDA, LaMDA++, IntTune, LayRA) run a few steps end to end on a tiny model (smoke mode:
the recipe's own adapter settings, a tiny local model, UDHR data, 3 steps) and train the parameters their kind
declares."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from slimtune.adapters.export import NATIVE_CONFIG, NATIVE_WEIGHTS
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.smoke import load_smoke_recipe
from slimtune.train.runner import run_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
ADAPTER_RECIPES = sorted(p for pat in ("lamda_*.yaml", "inttune_*.yaml", "layra_*.yaml") for p in RECIPES_DIR.glob(pat)
                         if p.name != "layra_continual.yaml")  # that one runs in test_language_recipes.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=4)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_every_seed_recipe_is_covered():
    kinds = {p.name.split("_")[0] for p in ADAPTER_RECIPES}
    assert {"lamda", "inttune", "layra"} <= kinds


@pytest.mark.parametrize("path", ADAPTER_RECIPES, ids=lambda p: p.stem)
def test_adapter_recipe_runs_a_few_steps_on_a_tiny_model(path, tmp_path, tiny):
    recipe, _ = load_smoke_recipe(path, root=tmp_path, model=str(tiny))
    recipe_kind = recipe.resolved_stages()[0][1].adapter.kind
    result = run_recipe(recipe, base_dir=RECIPES_DIR)
    assert not result["interrupted"]
    trained = [s for s in result["stages"] if s.get("steps")]
    assert trained, result["stages"]
    last = trained[-1]
    assert last["final_loss"] is not None
    native = Path(last["outputs"]["adapter_native"])
    assert (native / NATIVE_CONFIG).is_file() and (native / NATIVE_WEIGHTS).is_file()
    assert Path(last["outputs"]["adapter"]).is_dir()  # the PEFT export
    assert recipe_kind in (native / NATIVE_CONFIG).read_text()
