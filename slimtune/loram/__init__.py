"""LoRAM (Zhang et al. 2025): train LoRA on a pruned base, use it on the original (DESIGN §2, LoRAM).

- `prune`: structured pruning (KV-head groups, MLP neurons), the kept-index map, pruned folders, the 15.81× figure.
- `align`: optional continued pretraining of the pruned model (full fine-tuning except lm_head).
- `recover`: expand an adapter trained on the pruned model to the original shapes.
- `pipeline`: the whole thing as one recipe (`run_loram`; ``slimtune run`` dispatches a recipe with ``loram:``).
- `estimate`: what a LoRAM recipe trains on (the pruning layout; slimtune.bench.estimate sizes the pruned model).

Submodules are imported on first use (the recipe schema imports this package's config early).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "KeptIndex": "prune",
    "load_pruned": "prune",
    "parameter_reduction": "prune",
    "prune_checkpoint": "prune",
    "prune_model": "prune",
    "save_pruned": "prune",
    "recover_adapter": "recover",
    "align_pruned": "align",
    "prune_to_folder": "pipeline",
    "merge_recovered": "pipeline",
    "run_loram": "pipeline",
    "pruned_layout": "estimate",
    "recipe_loram_layout": "estimate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slimtune.loram.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slimtune.loram' has no attribute {name!r}")
