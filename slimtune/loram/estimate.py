"""What a LoRAM recipe trains on, for the memory estimator: the pruning layout (DESIGN §2 LoRAM, §4).

The estimator (``slimtune.bench.estimate``, one layer up) sizes the PRUNED model by running LoRAM's own
``prune_model`` on a meta-device model and reading each layer's geometry from the kept-index map, in one pass (no
second estimate to subtract). This module holds what only LoRAM knows: whether a recipe trains on a pruned model
(``recipe_loram_layout``) and, for display, how many units a pruned layer keeps (``pruned_layout``, with
``prune``'s rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.models.load import resolve_package_path
from slimtune.loram.prune import KEPT_FILE, Geometry, KeptIndex, _n_keep, validate_prune_args

__all__ = ["pruned_layout", "recipe_loram_layout"]


def pruned_layout(config, ratio: float, keep_first: int = 0, keep_last: int = 0) -> dict[str, int]:
    """Kept units per pruned layer and how many layers are pruned, with prune.py's rounding."""
    geo = Geometry.from_config(config)
    validate_prune_args(ratio, "random", keep_first, keep_last, geo.num_layers)
    kv_keep = _n_keep(geo.num_kv_heads, ratio)
    return {
        "pruned_layers": geo.num_layers - keep_first - keep_last,
        "intact_layers": keep_first + keep_last,
        "num_key_value_heads": kv_keep,
        "num_attention_heads": kv_keep * geo.group,
        "intermediate_size": _n_keep(geo.intermediate_size, ratio),
    }


def recipe_loram_layout(recipe: Any) -> dict[str, Any] | None:
    """{ratio, keep_first, keep_last} when a recipe trains on a LoRAM-pruned model — it has a ``loram`` block, or its
    ``model.name`` is a pruned folder (loram.json: the map's own settings) — else None."""
    lc = getattr(recipe, "loram", None)
    if lc is not None:
        return {"ratio": float(lc.ratio), "keep_first": lc.keep_first, "keep_last": lc.keep_last}
    path = Path(resolve_package_path(recipe.model.name))
    if (path / KEPT_FILE).is_file():
        kept = KeptIndex.load(path)
        return {"ratio": kept.ratio, "keep_first": kept.keep_first, "keep_last": kept.keep_last}
    return None
