"""Recipes: typed YAML jobs. ``load_recipe(path, overrides)`` → ``Recipe`` or a one-line ``RecipeError``.

A recipe has the sections ``model``, ``quant``, ``adapter``, ``data``, ``train``, ``eval``, ``output`` and optional
``stages``: a list of partial recipes (each may override ``data``, ``adapter``, ``train``, ``eval``) run in order,
each starting from the previous stage's merged model (``start_from: merged``) or continuing its adapter
(``start_from: adapter``); a stage's ``kind`` may also be ``merge``, ``eval`` or ``arithmetic`` (see StageConfig). Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error
naming its dotted path. Overrides on the command line use the same paths: ``--set train.lr=1e-4``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.adapters.base import adapter_config_union, modes, registry
from slimtune.config.data import DataConfig
from slimtune.config.eval import EvalConfig
from slimtune.config.grpo import GRPOConfig
from slimtune.config.objective import OBJECTIVE_ALIASES, Objective, PreferenceConfig
from slimtune.errors import RecipeError
from slimtune.models.load import ModelConfig, QuantConfig

AdapterSpec = adapter_config_union()


class TrainConfig(BaseModel):
    """The optimisation (recipe key ``train``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

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
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the trainable adapter weights and their gradients; bfloat16 keeps fp32 master copies inside the
    optimizer only (slimtune.train.optim.MasterWeights)."""
    optimizer_on: Literal["device", "cpu"] = "device"
    """Where the fp32 master copies and the optimizer state live: with the parameters, or in host memory."""
    embeddings_on: Literal["gpu", "cpu"] = "gpu"
    """cpu: the frozen input embedding table stays in (pinned) host memory; only the looked-up rows travel
    (slimtune.models.embeddings). Refused for a tied, unquantized lm_head and for a trained table."""
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_checkpointing: Literal["none", "full", "offload"] = "none"
    """Recompute each decoder layer in backward (full), and keep its input in pinned CPU memory (offload)."""
    seed: int = Field(42, ge=0, lt=2**63)
    kernels: Literal["auto", "triton", "dequant", "torch"] = "auto"
    """Fused-op backend. auto: on CUDA each op's candidates (triton, dequant = dequantize + cuBLAS, torch) are
    timed on the real inputs at first use and the fastest correct one kept (cached on disk); torch on CPU."""
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
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Several processes (torchrun, ``slimtune run --nproc N``): ddp keeps the whole base on every rank and
    all-reduces the adapter gradients; fsdp shards the 4-bit base, the adapters and their optimizer state over the
    ranks (torch FSDP2, slimtune.train.fsdp), for a base that does not fit one card. One process: no effect."""
    eval_every: int = Field(0, ge=0)
    """Validation loss and perplexity every N optimizer steps on the records `data.val_split` keeps out (and at
    the end); 0: never during training."""
    keep_best: bool = False
    """With eval_every: also keep the adapter of the lowest validation loss (best_adapter/, PEFT format)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "jsonl"]] = Field(default_factory=list)
    """Metric loggers besides metrics.jsonl (always written; `jsonl` names it): TensorBoard event files under
    <run>/tensorboard, Weights & Biases (WANDB_MODE=offline works), MLflow (MLFLOW_TRACKING_URI, default
    sqlite:///<run>/mlflow.db). Each needs its library (pip install 'slimtune[tensorboard]', '[wandb]', '[mlflow]')."""
    objective: Objective = "sft"
    """What a step optimises (slimtune/objectives): sft (next-token loss on the targets), or preference tuning on
    `data.format: preference` pairs: dpo (cDPO with preference.label_smoothing), ipo, orpo, simpo; kto on
    `data.format: kto` (prompt, completion, label)."""
    preference: PreferenceConfig = PreferenceConfig()
    """The preference objectives' knobs: beta, label_smoothing, gamma, length_normalize, desirable/undesirable
    weights, precompute_reference."""
    grpo: GRPOConfig = GRPOConfig()
    """`objective: grpo` on `data.format: prompt`: rewards, num_generations, sampling, beta, epsilon, loss_type,
    scale_rewards, num_iterations (slimtune.config.grpo)."""

    @model_validator(mode="before")
    @classmethod
    def _bool_checkpointing(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("objective") in OBJECTIVE_ALIASES:
            data = {**data, "objective": OBJECTIVE_ALIASES[data["objective"]]}
        if isinstance(data, dict) and isinstance(data.get("grad_checkpointing"), bool):
            data = {**data, "grad_checkpointing": "full" if data["grad_checkpointing"] else "none"}
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            data = {**data, "report_to": [] if data["report_to"] == "none" else [data["report_to"]]}
        return data

    @model_validator(mode="after")
    def _keep_best(self) -> TrainConfig:
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best: needs train.eval_every (and data.val_split)")
        return self


class GGUFOutputConfig(BaseModel):
    """A GGUF export at the end of the run (recipe key ``output.gguf``; slimtune.export writes it)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    quant: Literal["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16"] | None = "Q4_K_M"
    """The merged model's GGUF file type (gguf/<run>-<quant>.gguf + an Ollama Modelfile); null: no merged file."""
    lora: bool = False
    """Also write the adapter alone as a llama.cpp LoRA GGUF (gguf/<run>-lora.gguf)."""
    onto: Literal["original", "dequantized"] = "original"
    """Merge into the base as stored, or into the NF4-dequantized weights the adapter was trained against."""


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
    gguf: GGUFOutputConfig | None = None
    """GGUF export at the end of the run (needs export_peft): {quant: Q4_K_M, lora: false}."""

    @field_validator("dir")
    @classmethod
    def _dir_placeholders(cls, v: str) -> str:
        try:
            v.format(name="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only the {{name}} placeholder is allowed ({type(e).__name__}: {e})") from None
        return v


class LoramAlignConfig(BaseModel):
    """LoRAM step 2, optional (recipe key ``loram.align``): continued pretraining of the pruned model on general
    text. Full fine-tuning: every weight of the pruned model trains except lm_head (with tied embeddings the
    embedding matrix is lm_head, so it stays frozen too). Usually done once per base: point several recipes at one
    ``dir`` and a finished alignment there is reused."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    data: DataConfig
    """General text (``format: text`` in the paper's setting)."""
    train: TrainConfig = TrainConfig(lr=1e-5, warmup=0.03)
    """Optimisation of the alignment (adapter-only keys such as ``fused`` and ``kernels`` are ignored)."""
    dir: str | None = None
    """Where the aligned pruned model is written (default: <run dir>/aligned)."""


class LoramConfig(BaseModel):
    """LoRAM (Zhang et al. 2025; recipe key ``loram``, DESIGN §2): prune the base, optionally align the pruned model,
    train the recipe's adapter on the pruned model (QLoRAM with ``quant: nf4``), recover the adapter to the original
    shapes, merge it into the original model and evaluate the original model before/after."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    ratio: float = Field(ge=0.0, lt=1.0)
    """Fraction of KV-head groups and MLP neurons removed in each pruned layer (floor; paper: 0.65-0.95)."""
    method: Literal["magnitude", "random"] = "magnitude"
    """Which units are kept: weight-magnitude importance (data-free structured pruning) or a seeded random choice."""
    keep_first: int = Field(0, ge=0)
    """Leading decoder layers left intact (paper: 4 of 80)."""
    keep_last: int = Field(0, ge=0)
    """Trailing decoder layers left intact (paper: 2 of 80)."""
    seed: int = 0
    """Seed of ``method: random``."""
    pruned_dir: str | None = None
    """Where the pruned model is written (default: <run dir>/pruned); a finished pruned model there with the same
    settings is reused."""
    align: LoramAlignConfig | None = None
    """Continued pretraining of the pruned model before the adapter is trained (null: none)."""
    merge: bool = True
    """Write the original model with the recovered adapter merged (<run dir>/merged) and evaluate it."""


class ArithmeticConfig(BaseModel):
    """Model arithmetic (stage ``kind: arithmetic``, LayRA's merge step): θ = θ_prev + λ·(θ_instruct − θ_base),
    where θ_prev = θ_base + Δ (the previous stage's model: every adapter trained so far, merged)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    instruct: str = Field(min_length=1)
    """The instruction-tuned sibling of the base (hub id, local folder, .gguf or pkg: file), e.g.
    Qwen/Qwen2.5-7B-Instruct for Qwen/Qwen2.5-7B."""
    base: str | None = None
    """θ_base of the task vector (default: the recipe's ``model.name``)."""
    lam: float = 1.0
    """λ, the weight of the instruction task vector (0: the previous model unchanged)."""
    tokenizer_from: Literal["instruct", "base"] = "instruct"
    """Whose tokenizer (and chat template) the written model gets."""


class StageConfig(BaseModel):
    """One stage of a multi-stage job: overrides of the top-level sections.

    ``kind`` says what the stage does: ``train`` (default) trains an adapter; ``merge`` merges the previous stage's
    adapter into its base and writes ``merged/``; ``eval`` only evaluates the current model (label = the stage
    name); ``arithmetic`` adds an instruction task vector to the current model (see ``ArithmeticConfig``) and writes
    ``merged/``. Non-train stages take no ``adapter``, ``data`` or ``train``.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Stage name (folder name under the run's stages/)."""
    kind: Literal["train", "merge", "eval", "arithmetic"] = "train"
    """What the stage does (see the class doc)."""
    start_from: Literal["merged", "adapter", "stacked", "base"] = "merged"
    """merged: the previous stage's merged model is this stage's base (merged, then re-quantized); adapter: keep
    training its adapter; stacked: keep its adapter frozen on the same base and train a new one over it (exact: no
    merge until the end); base: start again from the recipe's base model. (eval stages: which model to evaluate.)"""
    adapter: AdapterSpec | None = None  # type: ignore[valid-type]
    data: DataConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    output: OutputConfig | None = None
    """Stage outputs; an explicit ``output.dir`` makes it the stage's folder instead of <run dir>/stages/<name>,
    so recipes naming the same folder share the stage (the first run trains it, the others find it done)."""
    arithmetic: ArithmeticConfig | None = None
    """``kind: arithmetic`` only: the instruct model and λ."""

    @model_validator(mode="after")
    def _kind_fields(self) -> StageConfig:
        if (self.kind == "arithmetic") != (self.arithmetic is not None):
            raise ValueError("arithmetic: required exactly when kind is arithmetic")
        if self.kind != "train":
            for key in ("adapter", "data", "train"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: not allowed in a {self.kind} stage (it trains nothing)")
        return self


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
    loram: LoramConfig | None = None
    """LoRAM pipeline (prune → align → train on the pruned model → recover → merge → eval); null: a normal run."""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.stages and self.data is None:
            raise ValueError("data: required (or give stages, each with its data)")
        for i, st in enumerate(self.stages):
            if st.kind == "train" and st.data is None and self.data is None:
                raise ValueError(f"stages.{i}.data: required when the recipe has no top-level data")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        if self.stages and self.stages[0].kind == "merge":
            raise ValueError("stages.0.kind: a merge stage needs a previous stage that trained an adapter")
        for st, r in self.resolved_stages():
            where = f"stages.{self.stages.index(st)}." if self.stages else ""
            if st.kind == "train" and r.train.distributed == "fsdp" and (r.adapter.kind == "full" or self.loram):
                what = "LoRAM (its pruned model is small)" if self.loram else "full fine-tuning (adapter.kind full)"
                raise ValueError(f"{where}train.distributed: fsdp shards a frozen base under adapters; {what} runs "
                                 f"with train.distributed: ddp")
            if st.kind == "train" and r.quant.compute_dtype == "float16" and r.train.fused and r.adapter.kind != "full":
                # the Trainer has no loss scaling: fp16 gradients through the fused ops underflow (issue 23)
                raise ValueError(f"quant.compute_dtype: float16 with {where}train.fused: the fused ops train without "
                                 "loss scaling (small fp16 gradients flush to zero); use bfloat16, or float32 on a "
                                 "GPU without bfloat16")
            if (st.kind == "train" and r.train.eval_every and r.data is not None and not r.data.holdout
                    and not r.data.eval_sources):
                raise ValueError(f"{where}train.eval_every: needs validation records: set data.val_split (a "
                                 "fraction such as 0.05, or a count) or data.eval_sources")
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


def _model_names() -> set[str]:
    """Class names of every pydantic model (pydantic puts a union member's class name into error locations)."""
    seen: set[str] = set()
    todo = [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__name__ not in seen:
                seen.add(sub.__name__)
                todo.append(sub)
    return seen


def _key_path(loc: tuple) -> str:
    """Dotted key path of a pydantic error location, without union tags (e.g. adapter.lora.rank → adapter.rank,
    adapter.layers.LayerRange.first → adapter.layers.first, adapter.targets.literal['all-linear'] →
    adapter.targets)."""
    kinds = set(registry()) | set(modes())
    models = _model_names()
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and (p in kinds and i > 0 and loc[i - 1] == "adapter"):
            continue
        if isinstance(p, str) and (p.startswith("function-") or p in {"tagged-union", "union"}):
            continue
        if isinstance(p, str) and i > 0 and (p in models or any(c in p for c in "[]'")):
            continue  # a union member's tag (class name, list[int], literal['all-linear'], ...)
        parts.append(str(p))
    return ".".join(parts) or "(top level)"


# Keys other trainers' configs use (axolotl, LLaMA-Factory, HF TrainingArguments) → slimtune's key path.
FOREIGN_KEYS = {
    "learning_rate": "train.lr", "lr_scheduler": "train.schedule", "lr_scheduler_type": "train.schedule",
    "num_epochs": "train.epochs", "num_train_epochs": "train.epochs", "max_steps": "train.steps",
    "micro_batch_size": "train.micro_batch", "per_device_train_batch_size": "train.micro_batch",
    "batch_size": "train.micro_batch", "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup", "warmup_ratio": "train.warmup", "optim": "train.optimizer",
    "gradient_checkpointing": "train.grad_checkpointing", "save_steps": "train.save_every",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "save_total_limit": "train.keep_checkpoints",
    "load_best_model_at_end": "train.keep_best", "report_to": "train.report_to", "seed": "train.seed",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "lora_r": "adapter.rank", "r": "adapter.rank", "lora_rank": "adapter.rank", "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout", "lora_target_modules": "adapter.targets", "lora_target": "adapter.targets",
    "target_modules": "adapter.targets", "use_rslora": "adapter.kind: rslora", "use_dora": "adapter.kind: dora",
    "sequence_len": "data.max_seq_len", "cutoff_len": "data.max_seq_len", "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len", "sample_packing": "data.packing", "val_set_size": "data.val_split",
    "val_size": "data.val_split", "datasets": "data.sources", "test_datasets": "data.eval_sources",
    "eval_dataset": "data.eval_sources", "dataset": "data.sources",
    "type": "data.format", "formatting": "data.format", "template": "data.chat_template",
    "base_model": "model.name", "model_name_or_path": "model.name", "tokenizer_type": "model.tokenizer",
    "load_in_4bit": "quant.mode: nf4", "quantization_bit": "quant.mode: nf4", "bf16": "quant.compute_dtype",
    "fp16": "quant.compute_dtype", "output_dir": "output.dir", "data_path": "data.sources",
}


def _sections_at(parts: list[str]) -> list[type[BaseModel]]:
    """The pydantic classes that can sit at a key path of a recipe (a union gives several)."""
    import types
    import typing

    def models_of(tp: Any) -> list[type[BaseModel]]:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [tp]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Annotated:
            args = args[:1]
        elif typing.get_origin(tp) is dict:
            args = args[1:]
        return [m for a in args if a is not type(None) and not isinstance(a, types.NoneType) for m in models_of(a)]

    cur: list[type[BaseModel]] = [Recipe]
    for part in parts:
        if part.isdigit():
            continue
        nxt = [m for c in cur if part in c.model_fields for m in models_of(c.model_fields[part].annotation)]
        if not nxt:
            return cur
        cur = nxt
    return cur


def did_you_mean(path: str) -> str:
    """A hint for an unknown key path: the slimtune name of another trainer's key, else the closest valid key."""
    import difflib

    parts = path.split(".")
    key = parts[-1]
    if key in FOREIGN_KEYS:
        return f" (did you mean {FOREIGN_KEYS[key]}? `{key}` is another trainer's name)"
    fields = sorted({f for c in _sections_at(parts[:-1]) for f in c.model_fields})
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join(parts[:-1] + close)}?)"
    return f" (valid keys here: {', '.join(fields)})" if fields and len(fields) <= 25 else ""


def _first_error(e: ValidationError) -> str:
    errors = e.errors()
    first = _key_path(tuple(errors[0].get("loc", ())))
    # A union reports one error per member: the deepest one under the same key names the actual problem
    # (adapter.layers: [-1] → adapter.layers.0, not "should be a dictionary").
    same = [x for x in errors if (_key_path(tuple(x.get("loc", ()))) + ".").startswith(first + ".")]
    err = max(same, key=lambda x: len(_key_path(tuple(x.get("loc", ()))).split(".")))
    path = _key_path(tuple(err.get("loc", ())))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key" + did_you_mean(path)
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ": " in msg and path == "(top level)":
            path, msg = msg.split(": ", 1)
    if err.get("type") == "missing":
        msg = "required key is missing"
    elif err.get("type") in ("union_tag_not_found", "union_tag_invalid"):  # e.g. adapter.kind missing or unknown
        ctx = err.get("ctx") or {}
        path = f"{path}.{str(ctx.get('discriminator', 'kind')).strip(chr(39))}"
        kinds = ", ".join(sorted(registry()))
        msg = ("required key is missing" if err["type"] == "union_tag_not_found"
               else f"unknown value {ctx.get('tag')!r}") + f" (one of {ctx.get('expected_tags') or kinds})"
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
        groups = [("sources", data.sources), ("eval_sources", data.eval_sources)]
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
    if recipe.loram is not None and recipe.loram.align is not None:
        check_data(recipe.loram.align.data, "loram.align.")


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


def recipe_changes(old: dict, new: dict, *, ignore: tuple[str, ...] = ("name", "description")) -> list[str]:
    """What differs between two dumped recipes, as `key.path: old → new` lines (sorted by key path)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out or {prefix[:-1]: {}}
        if isinstance(d, list) and d and any(isinstance(x, (dict, list)) for x in d):
            out = {}
            for i, v in enumerate(d):
                out.update(flat(v, f"{prefix}{i}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(old), flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignore or a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        lines.append(f"{key}: {a.get(key, '<unset>')!r} → {b.get(key, '<unset>')!r}")
    return lines
