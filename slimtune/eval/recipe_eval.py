"""`slimtune eval RECIPE`: run a recipe's `eval:` block on its base model, another model or a trained adapter.

The result is added (under its label) to ``eval.json`` / ``eval.md`` in the run folder (or ``out_dir``), next to the
before/after columns the training run wrote, so every state of a model sits side by side in one report.

    result, (json_path, md_path) = evaluate_recipe(recipe, base_dir=recipe_dir, adapter=Path("runs/x"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.adapters.export import NATIVE_CONFIG
from slimtune.config.eval import EvalConfig
from slimtune.config.recipe import Recipe
from slimtune.errors import SlimtuneError
from slimtune.eval.model_eval import evaluate_model
from slimtune.eval.runner import read_report, write_report
from slimtune.models.load import ModelConfig


def recipe_eval_config(recipe: Recipe, stage: str | None = None) -> tuple[EvalConfig, Recipe]:
    """The eval block to run and the stage recipe it belongs to: the named stage's, else the top-level one, else
    the last stage that has one."""
    stages = recipe.resolved_stages()
    if stage is not None:
        for st, r in stages:
            if st.name == stage:
                if r.eval is None:
                    raise SlimtuneError(f"--stage {stage}: that stage has no eval: section")
                return r.eval, r
        raise SlimtuneError(f"--stage {stage}: no such stage (have {', '.join(s.name for s, _ in stages)})")
    if recipe.eval is not None:
        return recipe.eval, stages[-1][1]
    for _, r in reversed(stages):
        if r.eval is not None:
            return r.eval, r
    raise SlimtuneError("eval: the recipe has no eval: section (nor does any stage)")


def _native_dir(path: Path) -> Path:
    for cand in (path, path / "adapter_native"):
        if (cand / NATIVE_CONFIG).is_file():
            return cand
    raise SlimtuneError(f"--adapter {path}: not a slimtune adapter (no adapter_native/ or slimtune_adapter.json)")


def evaluate_recipe(
    recipe: Recipe, *, base_dir: Path, model: str | None = None, adapter: Path | None = None,
    label: str | None = None, out_dir: Path | None = None, stage: str | None = None, log=None,
) -> tuple[dict[str, Any], tuple[Path, Path]]:
    """Evaluate and write the report (see the module doc). ``model`` replaces the recipe's model; ``adapter`` (a
    run or stage folder, or its adapter_native/) is loaded onto the model it was trained on (``model`` wins)."""
    log = log or (lambda _msg: None)
    cfg, r = recipe_eval_config(recipe, stage)
    native = _native_dir(Path(adapter)) if adapter is not None else None
    if model is not None:
        model_cfg = ModelConfig(name=model, trust_remote_code=recipe.model.trust_remote_code)
    elif native is not None:
        saved = json.loads((native / NATIVE_CONFIG).read_text()).get("base_model")
        same = saved == recipe.model.name
        model_cfg = recipe.model if (same or not saved) else ModelConfig(name=saved)
    else:
        model_cfg = recipe.model
    if label is None:
        label = f"adapter {Path(adapter).name}" if adapter is not None else (f"model {Path(model).name}" if model
                                                                            else "base")
    result = evaluate_model(model_cfg, recipe.quant, cfg, base_dir=base_dir, label=label, device=r.train.device,
                            adapter=native, data=r.data, seed=r.train.seed, log=log)
    out = Path(out_dir) if out_dir is not None else recipe.run_dir()
    report = read_report(out)
    report[label] = result
    return result, write_report(report, out)
