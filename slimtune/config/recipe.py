"""Recipes: typed YAML jobs. ``load_recipe(path, overrides)`` → ``Recipe`` or a one-line ``RecipeError``.

A recipe has the sections ``model``, ``quant``, ``adapter``, ``data``, ``train``, ``eval``, ``output`` and optional
``stages``: a list of partial recipes (each may override ``data``, ``adapter``, ``train``, ``eval``) run in order,
each starting from the previous stage's merged model (``start_from: merged``) or continuing its adapter
(``start_from: adapter``). Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error
naming its dotted path. Overrides on the command line use the same paths: ``--set train.lr=1e-4``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimtune.adapters.base import adapter_config_union, registry
from slimtune.config.data import DataConfig
from slimtune.config.eval import EvalConfig
from slimtune.errors import RecipeError
from slimtune.models.load import ModelConfig, QuantConfig

AdapterSpec = adapter_config_union()


class TrainConfig(BaseModel):
    """The optimisation (recipe key ``train``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up (to 0 for cosine/linear)."""
    warmup: float = Field(0.03, ge=0)
    """Warm-up: a fraction of the steps when < 1, else a number of optimizer steps."""
    steps: int | None = Field(None, gt=0)
    """Optimizer steps; when unset, ``epochs`` decides."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the data (used when ``steps`` is unset)."""
    micro_batch: int = Field(1, gt=0)
    """Sequences per forward/backward."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step; the loss is normalised by the target tokens of all of them."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """torch AdamW (fp32 state) or bitsandbytes 8-bit (paged) AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_checkpointing: Literal["none", "full", "offload"] = "none"
    """Recompute each decoder layer in backward (full), and keep its input in pinned CPU memory (offload)."""
    seed: int = 42
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused-op backend: Triton on CUDA, the torch reference elsewhere (auto)."""
    fused: bool = True
    """Swap supported decoder layers to the fused ops (layers that cannot take it are listed in the log)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many step checkpoints to keep."""
    log_every: int = Field(1, gt=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient stops the run (keeping the last good checkpoint) or skips that step."""

    @model_validator(mode="before")
    @classmethod
    def _bool_checkpointing(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("grad_checkpointing"), bool):
            data = {**data, "grad_checkpointing": "full" if data["grad_checkpointing"] else "none"}
        return data


class OutputConfig(BaseModel):
    """What a run writes (recipe key ``output``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dir: str = "runs/{name}"
    """Run folder ({name} = the recipe's name), relative to the working directory."""
    export_peft: bool = True
    """Write the adapter in PEFT format (adapter/)."""
    save_merged: bool = False
    """Write the merged full model (merged/: safetensors + config + tokenizer)."""
    merged_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class StageConfig(BaseModel):
    """One stage of a multi-stage job: overrides of the top-level sections."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Stage name (folder name under the run's stages/)."""
    start_from: Literal["merged", "adapter", "base"] = "merged"
    """merged: the previous stage's merged model is this stage's base; adapter: keep training its adapter; base:
    start again from the recipe's base model."""
    adapter: AdapterSpec | None = None  # type: ignore[valid-type]
    data: DataConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    output: OutputConfig | None = None


class Recipe(BaseModel):
    """A whole job."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = ""
    """Run name (default: the file name without .yaml)."""
    description: str = ""
    """One line shown by `slimtune recipes`."""
    model: ModelConfig
    quant: QuantConfig = QuantConfig()
    adapter: AdapterSpec  # type: ignore[valid-type]
    data: DataConfig | None = None
    """Training data; required unless every stage gives its own."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig | None = None
    output: OutputConfig = OutputConfig()
    stages: list[StageConfig] = Field(default_factory=list)
    """Multi-stage job; empty = one stage made of the top-level sections."""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.stages and self.data is None:
            raise ValueError("data: required (or give stages, each with its data)")
        for i, st in enumerate(self.stages):
            if st.data is None and self.data is None:
                raise ValueError(f"stages.{i}.data: required when the recipe has no top-level data")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        return self

    def resolved_stages(self) -> list[tuple[StageConfig, Recipe]]:
        """Each stage as (stage, a single-stage Recipe with the overrides applied). No stages → one 'main' stage."""
        if not self.stages:
            return [(StageConfig(name="main", start_from="base"), self)]
        out = []
        for st in self.stages:
            r = self.model_copy(
                update={
                    "adapter": st.adapter or self.adapter,
                    "data": st.data or self.data,
                    "train": st.train or self.train,
                    "eval": st.eval if st.eval is not None else self.eval,
                    "output": st.output or self.output,
                    "stages": [],
                }
            )
            out.append((st, r))
        return out

    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))


# --------------------------------------------------------------------------------------------- loading


def _key_path(loc: tuple) -> str:
    """Dotted key path of a pydantic error location, without union tags (e.g. adapter.lora.rank → adapter.rank)."""
    kinds = set(registry())
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and (p in kinds and i > 0 and loc[i - 1] == "adapter"):
            continue
        if isinstance(p, str) and (p.startswith("function-") or p in {"tagged-union", "union"}):
            continue
        parts.append(str(p))
    return ".".join(parts) or "(top level)"


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    path = _key_path(tuple(err.get("loc", ())))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ": " in msg and path == "(top level)":
            path, msg = msg.split(": ", 1)
    if err.get("type") == "missing":
        msg = "required key is missing"
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{path}: {msg}{extra}"


def apply_overrides(data: dict, overrides: list[str] | None, *, source: str = "--set") -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a nested dict (copied)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"{source} {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.strip().split(".")
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"{source} {key}: {'.'.join(parts[: j + 1])} is not a section")
            node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"{source} {key}: {'.'.join(parts[:-1])} is not a section")
    return data


def _check_paths(recipe: Recipe, base_dir: Path, file: str) -> None:
    """Local data files named by the recipe must exist (hub sources and globs are checked when read)."""

    def check_data(data: DataConfig | None, prefix: str) -> None:
        if data is None:
            return
        groups = [("sources", data.sources)]
        if data.replay is not None:
            groups.append(("replay.sources", data.replay.sources))
        for group, sources in groups:
            for i, src in enumerate(sources):
                if src.path.startswith("hub:") or any(c in src.path for c in "*?["):
                    continue
                p = resolve_path(src.path, base_dir)
                if not p.exists():
                    raise RecipeError(f"{file}: {prefix}data.{group}.{i}.path: file not found: {src.path}")

    check_data(recipe.data, "")
    for i, st in enumerate(recipe.stages):
        check_data(st.data, f"stages.{i}.")


def resolve_path(path: str, base_dir: Path) -> Path:
    """Expand ~ and $VARS; relative paths are taken from the recipe's folder first, then the working directory."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if p.is_absolute():
        return p
    cand = base_dir / p
    return cand if cand.exists() or not p.exists() else p


def load_recipe_dict(data: dict, *, file: str = "<recipe>", base_dir: Path | None = None, name: str = "") -> Recipe:
    """Validate an already-parsed recipe (after overrides)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: the recipe must be a mapping of sections (model, adapter, data, ...)")
    data = dict(data)
    data.setdefault("name", name)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{file}: {_first_error(e)}") from None
    _check_paths(recipe, base_dir or Path("."), file)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe. Every problem is one RecipeError line naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections (model, adapter, data, ...)")
    data = apply_overrides(data, overrides)
    return load_recipe_dict(data, file=str(path), base_dir=path.parent, name=path.stem)
