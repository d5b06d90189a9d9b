"""quant.compute_dtype: float16 is refused on the fused path (issue 23 item 6): the Trainer has no loss scaling."""

import pytest

from slimtune.config.recipe import load_recipe_dict
from slimtune.errors import RecipeError
from slimtune.models.tiny import udhr_path


def _recipe(**train):
    return {"model": {"name": "tiny-llama"}, "quant": {"mode": "nf4", "compute_dtype": "float16"},
            "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
            "data": {"sources": [{"path": str(udhr_path("src"))}], "format": "text"}, "train": train}


def test_float16_compute_is_refused_on_the_fused_path_in_one_line():
    with pytest.raises(RecipeError) as err:
        load_recipe_dict(_recipe())  # train.fused defaults to true
    msg = str(err.value)
    assert "quant.compute_dtype: float16" in msg and "loss scaling" in msg and "bfloat16" in msg
    assert "\n" not in msg
    multi = {**_recipe(), "stages": [{"name": "a", "start_from": "base"},
                                     {"name": "b", "start_from": "stacked", "train": {"fused": True}}]}
    with pytest.raises(RecipeError, match="float16 with stages"):
        load_recipe_dict(multi)


def test_float16_stays_allowed_where_nothing_is_fused():
    assert load_recipe_dict(_recipe(fused=False)).quant.compute_dtype == "float16"
    assert load_recipe_dict({**_recipe(), "quant": {"mode": "nf4", "compute_dtype": "bfloat16"}})
