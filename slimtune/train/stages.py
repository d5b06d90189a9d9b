"""What a multi-stage run carries from stage to stage, and the stages that train nothing (merge, eval, arithmetic).

``StageState`` is "the model so far": the model config an adapter was trained on, that adapter, and the merged
model folder when one was written. ``run_recipe`` (slimtune.train.runner) threads it through the stages and saves
it in each ``stage_summary.json``, so a re-run that skips a finished stage picks up exactly where it left off.

Stage kinds (``StageConfig.kind``):

- ``train``: the Trainer (in the runner).
- ``merge``: merge the current adapter into its base (full precision, as ``slimtune merge``) → ``<stage>/merged``.
- ``eval``: evaluate the current model (``start_from`` picks it: base, merged, or base + adapter); label = stage name.
- ``arithmetic``: θ = θ_prev + λ·(θ_instruct − θ_base) with θ_prev the current model made dense
  (``slimtune.adapters.arithmetic.apply_task_vector``) → ``<stage>/merged``, then evaluated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.adapters.arithmetic import apply_task_vector
from slimtune.adapters.export import load_native
from slimtune.adapters.inject import merge
from slimtune.config.recipe import Recipe, StageConfig
from slimtune.errors import SlimtuneError
from slimtune.eval.model_eval import evaluate_model
from slimtune.models.load import DTYPES, ModelConfig, QuantConfig, load_model, load_tokenizer, resolve_package_path
from slimtune.train.merge import make_saveable, merge_to_folder
from slimtune.train.report import Reporter


@dataclass
class StageState:
    """The current model after a stage: ``model`` (ModelConfig as a dict) carries ``adapter``; ``merged`` is the
    folder of the model with every adapter so far merged in (None when no stage wrote one)."""

    model: dict[str, Any] | None = None
    adapter: str | None = None
    merged: str | None = None

    def model_config(self, fallback: ModelConfig) -> ModelConfig:
        return ModelConfig.model_validate(self.model) if self.model else fallback

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_summary(cls, summary: dict[str, Any], r: Recipe, sdir: Path) -> StageState:
        """The state a finished stage left (older summaries without one: derived from its folder)."""
        if isinstance(summary.get("state"), dict):
            return cls(**summary["state"])
        adapter, merged = sdir / "adapter_native", sdir / "merged"
        return cls(model=r.model.model_dump(mode="json"), adapter=str(adapter) if adapter.is_dir() else None,
                   merged=str(merged) if (merged / "config.json").is_file() else None)


def stage_folder(recipe: Recipe, stage: StageConfig, run_dir: Path, n_stages: int) -> Path:
    """<run dir> (one stage), <run dir>/stages/<name>, or the stage's own ``output.dir`` when it sets one."""
    if stage.output is not None and "dir" in stage.output.model_fields_set:
        return Path(stage.output.dir.format(name=recipe.name))
    return run_dir if n_stages == 1 else run_dir / "stages" / stage.name


def fingerprint(stage: StageConfig, r: Recipe) -> str:
    """Hash of what a stage computes (its kind and the resolved recipe, without eval/output/name/description)."""
    body = {"stage": stage.model_dump(mode="json", exclude={"eval", "output"}),
            "recipe": r.model_dump(mode="json", exclude={"eval", "output", "name", "description", "stages"})}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def tokens_per_source(data_stats: dict[str, Any] | None) -> dict[str, int]:
    """{source name: tokens trained on} from a TrainData's stats (main and replay sources)."""
    return {name: int(st.get("tokens", 0)) for name, st in ((data_stats or {}).get("sources") or {}).items()}


def _evaluate_loaded(model_cfg: ModelConfig, adapter: str | None, r: Recipe, base_dir: Path, label: str,
                     reporter: Reporter) -> dict | None:
    if r.eval is None:
        return None
    return evaluate_model(model_cfg, r.quant, r.eval, base_dir=base_dir, label=label, device=r.train.device,
                          adapter=Path(adapter) if adapter else None, data=r.data, seed=r.train.seed,
                          log=reporter.log)


def _summary(stage: StageConfig, state: StageState, evals: dict, outputs: dict[str, str]) -> dict[str, Any]:
    return {"stage": stage.name, "kind": stage.kind, "steps": 0, "total_steps": 0, "interrupted": False,
            "first_loss": None, "final_loss": None, "wall_seconds": 0.0, "outputs": outputs, "eval": evals,
            "state": state.to_json()}


# ----------------------------------------------------------------------------------------------- stage kinds
def run_merge_stage(stage: StageConfig, r: Recipe, state: StageState, sdir: Path, base_dir: Path,
                    reporter: Reporter) -> tuple[dict[str, Any], StageState]:
    """Merge the current adapter into its base, full precision, into ``sdir/merged``."""
    if not state.adapter:
        raise SlimtuneError(f"stages.{stage.name}: nothing to merge (no earlier stage trained an adapter)")
    model_cfg = state.model_config(r.model)
    reporter.log(f"stage {stage.name}: merging {state.adapter} into {model_cfg.name}")
    merged = merge_to_folder(model_cfg, Path(state.adapter), sdir / "merged", dtype=r.output.merged_dtype)
    new = StageState(model=state.model, adapter=state.adapter, merged=str(merged))
    evals: dict[str, Any] = {}
    if stage.eval is not None:  # a merge changes nothing but the precision: evaluate only when asked
        res = _evaluate_loaded(ModelConfig(name=str(merged)), None, r, base_dir, f"after {stage.name}", reporter)
        if res is not None:
            evals[res["label"]] = res
    return _summary(stage, new, evals, {"merged": str(merged)}), new


def run_eval_stage(stage: StageConfig, r: Recipe, base_model: ModelConfig, state: StageState, base_dir: Path,
                   reporter: Reporter) -> tuple[dict[str, Any], StageState]:
    """Evaluate the model ``start_from`` names (base / merged / adapter); the state is unchanged."""
    adapter = None
    if stage.start_from == "base" or (state.model is None and state.merged is None):
        model_cfg = base_model
    elif stage.start_from == "merged" and state.merged:
        model_cfg = ModelConfig(name=state.merged)
    elif state.adapter:
        model_cfg, adapter = state.model_config(base_model), state.adapter
    else:
        raise SlimtuneError(f"stages.{stage.name}: start_from {stage.start_from}: no earlier stage produced one")
    evals: dict[str, Any] = {}
    res = _evaluate_loaded(model_cfg, adapter, r, base_dir, stage.name, reporter)
    if res is not None:
        evals[res["label"]] = res
    else:
        reporter.warn(f"stage {stage.name}: kind eval but no eval: section; nothing measured")
    return _summary(stage, state, evals, {}), state


def _weights(name: str, cache: dict[str, Any]):
    """A TensorSource input for a model: a local folder with safetensors (read lazily), a cached hub snapshot, or
    (GGUF, pkg:, folders without safetensors) the model loaded on CPU in fp32."""
    if name in cache:
        return cache[name]
    path = Path(resolve_package_path(name)).expanduser()
    src: Any = None
    if path.is_dir() and any(path.glob("*.safetensors")):
        src = path
    elif not path.exists() and "/" in name and not name.startswith(("pkg:", ".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            snap = Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
            src = snap if any(snap.glob("*.safetensors")) else None
        except Exception:  # offline / not cached: fall back to loading the model
            src = None
    if src is None:
        src = load_model(ModelConfig(name=name), QuantConfig(mode="none", compute_dtype="float32"), device="cpu").model
    cache[name] = src
    return src


def run_arithmetic_stage(stage: StageConfig, r: Recipe, base_model: ModelConfig, state: StageState, sdir: Path,
                         base_dir: Path, reporter: Reporter) -> tuple[dict[str, Any], StageState]:
    """θ = θ_prev + λ·(θ_instruct − θ_base) → ``sdir/merged`` (+ slimtune_arithmetic.json), then evaluated."""
    spec = stage.arithmetic
    assert spec is not None
    base_name = spec.base or base_model.name
    fp32 = QuantConfig(mode="none", compute_dtype="float32")
    if state.merged:
        prev_cfg, adapter = ModelConfig(name=state.merged), None
    else:
        prev_cfg, adapter = state.model_config(base_model), state.adapter
    reporter.log(f"stage {stage.name}: θ = ({prev_cfg.name}" + (f" + {adapter}" if adapter else "")
                 + f") + {spec.lam}·({spec.instruct} − {base_name})")
    model = load_model(prev_cfg, fp32, device="cpu").model
    if adapter:
        load_native(model, Path(adapter))
        merge(model, dtype=torch.float32)
    cache: dict[str, Any] = {}
    try:
        apply_task_vector(model, _weights(base_name, cache), _weights(spec.instruct, cache), spec.lam)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise SlimtuneError(f"stages.{stage.name}.arithmetic: {e}") from None
    del cache
    out = sdir / "merged"
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(DTYPES[r.output.merged_dtype])
    model.config.use_cache = True
    make_saveable(model)
    model.save_pretrained(out, safe_serialization=True)
    tok_src = spec.instruct if spec.tokenizer_from == "instruct" else base_name
    load_tokenizer(ModelConfig(name=tok_src)).save_pretrained(out)
    record = {"formula": "theta_prev + lam * (theta_instruct - theta_base)", "prev": prev_cfg.name,
              "adapter": adapter, "base": base_name, "instruct": spec.instruct, "lam": spec.lam,
              "tokenizer_from": spec.tokenizer_from}
    (out / "slimtune_arithmetic.json").write_text(json.dumps(record, indent=2))
    del model
    new = StageState(model={"name": str(out)}, adapter=None, merged=str(out))
    evals: dict[str, Any] = {}
    res = _evaluate_loaded(ModelConfig(name=str(out)), None, r, base_dir, f"after {stage.name}", reporter)
    if res is not None:
        evals[res["label"]] = res
    return _summary(stage, new, evals, {"merged": str(out)}), new
