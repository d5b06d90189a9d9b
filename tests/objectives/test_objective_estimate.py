"""`slimtune estimate` knows the objective: a DPO pair is two rows in one forward, the reference adds nothing to the
peak (in the step: no_grad, nothing saved; precomputed: on disk), and Llama-3.1-8B DPO with one 2048 + 2048-token
pair fits 6.5 GiB with the floor settings of recipes/dpo_llama31_8b_floor.yaml."""

from pathlib import Path

from slimtune.bench.estimate import GiB
from slimtune.bench.recipe_estimate import estimate_for_recipe
from slimtune.config.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_dpo_8b_one_pair_under_6_5_gib():
    r = load_recipe(RECIPES / "dpo_llama31_8b_floor.yaml")
    est = estimate_for_recipe(r, 24)
    assert r.train.micro_batch == 1 and est.inputs["micro_batch"] == 2 and est.inputs["seq_len"] == 2048
    assert est.total_bytes <= 6.5 * GiB, est.total_bytes / GiB
    assert any("chosen + rejected in one forward: 2 rows" in n for n in est.notes)
    sft = load_recipe(RECIPES / "dpo_llama31_8b_floor.yaml", overrides=["train.objective=sft",
                                                                        "data.format=text"])
    one = estimate_for_recipe(sft, 24)
    assert one.inputs["micro_batch"] == 1 and one.total_bytes < est.total_bytes  # SFT: one row per example


def test_precomputed_reference_is_noted_and_kto_is_one_row():
    r = load_recipe(RECIPES / "dpo_qwen25_3b_ultrafeedback.yaml",
                    overrides=["train.preference.precompute_reference=true"])
    est = estimate_for_recipe(r, 24)
    assert est.inputs["micro_batch"] == 4 and any("precomputed" in n for n in est.notes)
    kto = estimate_for_recipe(load_recipe(RECIPES / "dpo_qwen25_3b_ultrafeedback.yaml",
                                          overrides=["train.objective=kto", "data.format=kto"]), 24)
    assert kto.inputs["micro_batch"] == 2 and kto.total_bytes < est.total_bytes
