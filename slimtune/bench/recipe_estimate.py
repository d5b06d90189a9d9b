"""The memory estimate of a recipe: one :class:`~slimtune.bench.estimate.Estimate` per training stage, from the
recipe's keys and the model's config alone (what ``slimtune estimate RECIPE`` prints)."""

from __future__ import annotations

from typing import Any

from slimtune.bench.configs import resolve_model_config
from slimtune.bench.estimate import Estimate, estimate, estimate_full
from slimtune.config.objective import PAIRED
from slimtune.errors import ModelError, SlimtuneError
from slimtune.loram.estimate import recipe_loram_layout
from slimtune.models.arch import spec_for
from slimtune.models.load import resolve_package_path
from slimtune.models.prequantized import bnb_4bit_config

__all__ = ["estimate_recipe_stages", "estimate_for_recipe"]


def estimate_recipe_stages(recipe: Any, gpu_mem_gib: float | None = 24.0) -> list[tuple[str, Estimate]]:
    """One estimate per stage of ``recipe`` (a ``slimtune.config.recipe.Recipe``), without weights or a GPU.

    The model config comes from ``recipe.model.name`` via :func:`resolve_model_config` (built-in table, local
    folder / config.json / GGUF, or a cached hub config; ``pkg:`` paths resolve to the file a package ships). Every
    stage shares that architecture (a merged previous stage has the same shapes). Mapping: ``quant.mode``,
    ``double_quant``, ``compute_dtype`` ("auto" is bfloat16, what a CUDA run uses), ``quantize_lm_head``; the whole
    ``adapter`` block (any registered kind, injected as the trainer injects it); ``train.optimizer``/``micro_batch``/
    ``grad_checkpointing``/``fused``; seq_len = ``data.max_seq_len``; LoRAM: the ``loram`` block or a pruned folder.
    ``train.objective``: a paired preference objective runs chosen + rejected in one forward (2 × micro_batch rows;
    see :func:`_objective_rows`).
    """
    try:
        config = resolve_model_config(resolve_package_path(recipe.model.name))
    except ModelError:
        raise
    except Exception as err:  # a GGUF/JSON reader failing on a malformed file: one line, not a traceback
        why = f"{type(err).__name__}: {err}"
        raise ModelError(f"model.name: {recipe.model.name}: cannot read its config ({why})") from None
    loram = recipe_loram_layout(recipe)  # LoRAM: the training-time peak is the pruned model's
    stored = _stored_4bit(config, recipe.model.name)
    out: list[tuple[str, Estimate]] = []
    for stage, r in recipe.resolved_stages():
        if getattr(stage, "kind", "train") != "train":  # merge / eval / arithmetic stages train nothing
            continue
        a, q, t = r.adapter, r.quant, r.train
        rows, why = _objective_rows(t, full=a.kind == "full")
        t = t.model_copy(update={"micro_batch": rows})
        if t.objective == "grpo":  # prompt + completion per row
            r = r.model_copy(update={"data": r.data.model_copy(update={
                "max_seq_len": t.grpo.max_prompt_len + t.grpo.max_new_tokens})})
        if a.kind == "full":  # full fine-tuning (slimtune.adapters.full): the trainer loads the base dense
            est = estimate_full(
                config, modules=a.modules, optimizer=t.optimizer, optimizer_on=getattr(t, "optimizer_on", "device"),
                compute_dtype="bfloat16" if q.compute_dtype == "auto" else q.compute_dtype,
                seq_len=r.data.max_seq_len, micro_batch=t.micro_batch, grad_checkpointing=t.grad_checkpointing,
                gpu_mem_gib=gpu_mem_gib, loram=loram)
            est.model = recipe.model.name
            est.notes += why
            out.append((stage.name, est))
            continue
        options = {k: v for k, v in a.model_dump().items() if k not in ("kind", "rank", "targets", "layers", "dropout")}
        if stored is not None and q.mode != "none":  # the checkpoint's 4-bit weights are what the GPU holds
            q = q.model_copy(update={"mode": stored["mode"], "double_quant": stored["double_quant"],
                                     "quantize_lm_head": False})
        est = estimate(
            config,
            quant=q.mode, double_quant=q.double_quant,
            compute_dtype="bfloat16" if q.compute_dtype == "auto" else q.compute_dtype,
            quantize_lm_head=q.quantize_lm_head,
            kind=a.kind, rank=a.rank, targets=a.targets, layers=a.layers, lora_dropout=a.dropout,
            adapter_options=options, optimizer=t.optimizer, seq_len=r.data.max_seq_len, micro_batch=t.micro_batch,
            grad_checkpointing=t.grad_checkpointing, fused=t.fused, gpu_mem_gib=gpu_mem_gib, loram=loram,
            adapter_dtype=t.adapter_dtype, embeddings_on=t.embeddings_on, optimizer_on=t.optimizer_on,
        )
        est.model = recipe.model.name + ("" if loram is None else f" pruned at ratio {loram['ratio']:g} (LoRAM)")
        est.notes += why
        if t.objective == "grpo":
            _grpo_generation(est, config, t)
        if stored is not None:  # always streamed as stored (slimtune.models.prequantized), whatever model.load says
            est.host_load_full_bytes = est.host_load_peak_bytes
            est.notes.append(f"pre-quantized bitsandbytes checkpoint: its {stored['mode']} weights"
                             f"{' (double quant)' if stored['double_quant'] else ''} are sized as stored"
                             + (", dequantized (quant.mode: none)" if q.mode == "none" else ""))
        out.append((stage.name, est))
    if not out:
        raise SlimtuneError(f"{recipe.name or 'recipe'}: no training stage to estimate")
    return out


def _objective_rows(train: Any, *, full: bool) -> tuple[int, list[str]]:
    """(rows per micro-batch forward, notes) of ``train.objective`` (slimtune/objectives). Paired preference: 2 rows
    per example. The reference pass (DPO/IPO/KTO with an adapter, not precomputed) runs the same rows with the
    adapters off under no_grad: it saves nothing for backward, and its transient buffers (one layer's, and one
    vocabulary block of the streamed head) are freed before the policy's forward, so it adds nothing to the peak.
    KTO's KL rows run under no_grad too."""
    obj = getattr(train, "objective", "sft")
    if obj == "sft":
        return train.micro_batch, []
    if obj == "grpo":
        g = train.grpo
        rows = train.micro_batch * g.num_generations
        return rows, [f"train.objective grpo: {train.micro_batch} prompts x G = {g.num_generations} completions: "
                      f"{rows} rows of <= {g.max_prompt_len} prompt + {g.max_new_tokens} completion tokens"
                      + (", reference (beta > 0) = the base with the adapters off under no_grad" if g.beta else "")]
    rows = train.micro_batch * (2 if obj in PAIRED else 1)
    notes = [f"train.objective {obj}: " + (f"chosen + rejected in one forward: {rows} rows of <= data.max_seq_len"
                                           if obj in PAIRED else f"{rows} rows + {rows} KL rows under no_grad")]
    if obj in ("dpo", "ipo", "kto"):
        pre = train.preference.precompute_reference
        pre = full if pre is None else pre
        notes.append("reference log-probs precomputed before training (16 bytes per example on disk); the step runs "
                     "one model" if pre else "reference = the base with the adapters off, under no_grad in the step: "
                     "no second model, no saved activations (its forward's transient buffers come before the "
                     "policy's)")
    return rows, notes


def _grpo_generation(est: Any, config: Any, train: Any) -> None:
    """GRPO's sampling phase: the KV cache of micro_batch × G rows of prompt + completion (compute dtype, every
    layer) and the last position's logits (fp32), on top of what persists (weights, adapter, optimizer states); it
    is freed before the step's forward and backward. The peak is the larger phase: when sampling is, the difference
    is added to the activations component."""
    spec = spec_for(config)
    geo = spec.geometry(config) if spec is not None else None
    layers = int(getattr(config, "num_hidden_layers", 0))
    rows, seq = train.micro_batch, train.grpo.max_prompt_len + train.grpo.max_new_tokens
    kv = 2 * layers * (geo.kv_heads * geo.head_dim if geo is not None else 0) * seq * rows * 2
    logits = rows * int(getattr(config, "vocab_size", 0)) * 4 * 2  # fp32 logits and their softmax
    persistent = sum(v for k, v in est.components().items() if k not in ("layer_inputs", "activations", "logits"))
    gen = persistent + kv + logits
    est.notes.append(f"GRPO sampling: KV cache {kv / 2**30:.2f} GiB for {rows} rows x {seq} tokens, phase peak "
                     f"{gen / 2**30:.2f} GiB (freed before the step's forward; the training step's peak is "
                     f"{est.total_bytes / 2**30:.2f} GiB)")
    if gen > est.total_bytes:
        est.activation_bytes += gen - est.total_bytes


def estimate_for_recipe(recipe: Any, gpu_mem_gib: float | None = 24.0) -> Estimate:
    """The estimate of the recipe's most demanding stage (the max over stages; see :func:`estimate_recipe_stages`)."""
    stages = estimate_recipe_stages(recipe, gpu_mem_gib)
    return max(stages, key=lambda s: s[1].total_bytes)[1]


def _stored_4bit(config: Any, name: str) -> dict | None:
    """{mode, double_quant} of a pre-quantized bitsandbytes 4-bit checkpoint's config, None for any other model."""
    q = getattr(config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    bnb = bnb_4bit_config({"quantization_config": q}, name)
    if bnb is None:
        return None
    return {"mode": bnb.get("bnb_4bit_quant_type", "nf4"), "double_quant": bool(bnb.get("bnb_4bit_use_double_quant"))}
