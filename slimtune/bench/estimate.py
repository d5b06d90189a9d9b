"""Peak GPU memory of a (Q)LoRA training step, from the model config alone, component by component.

The estimate reads the real code (``slimtune.bench.inventory``): the model is built on the meta device, pruned by
LoRAM's own ``prune_model`` for a LoRAM recipe, its adapters injected through the adapter registry and
``fuse_model`` run on it, so shapes, adapter tensors and fused-vs-unfused are the trainer's; per-layer geometry and
norms come from the family's ``ArchSpec``. Every term is an explicit byte count; the ones that grow with the batch
are linear in the number of tokens (micro_batch x seq_len) — eager attention (Gemma 2) adds a term in
tokens x seq_len — so the longest sequence that fits a memory cap is solved in closed form. The model:

weights
    Linear weights of the decoder layers: compute dtype (quant "none") or 4-bit (nf4/fp4, bitsandbytes layout):
    two codes per byte, one absmax per block of 64; with double quant the absmax are uint8 codes with one fp32
    second-level absmax per 256 blocks and an fp32 offset, so 0.5 + 1/64 + 4/16384 = 0.5159 byte per parameter,
    plus per-weight code tables (16 fp32 NF4 codes, 256 fp32 second-level codes). Embeddings, lm_head (unless
    `quantize_lm_head`: then NF4 among the linear weights, a tied head as its own copy), norms and biases stay in the
    compute dtype. `embeddings_on: cpu` moves the input table to (pinned) host memory (`host_bytes`; refused for a
    tied dense head, as the trainer refuses it).
adapter params / grads / optimizer
    Every adapter tensor the injected adapters hold, in `adapter_dtype` (fp32 by default: 4 B); the trainable
    ones also have gradients (same dtype) and AdamW's two moments (2 x adapter dtype), or 8-bit AdamW's two uint8
    moments + one fp32 absmax per 256 values and moment (bitsandbytes keeps tensors under 4,096 values in 32-bit
    state). Frozen adapter tensors (LaMDA's A and frozen B columns, IntTune's A and B) count as params only.
    `adapter_dtype: bfloat16` or `optimizer_on: cpu` (slimtune.train.optim.MasterWeights): fp32 masters (4 B) plus
    the inner optimizer's fp32 state, on the GPU (the same bytes as fp32 adapters: 2 + 2 + 4 = 4 + 4) or in host
    memory (then the GPU holds only the adapter and its gradient).
    modules_to_save train in full (counted with the adapters).
activations
    What autograd keeps for backward, per token per layer (``slimtune.bench.activations``), summed over the
    layers that keep it: all of them without checkpointing; with `full` checkpointing each layer's input
    (hidden x compute dtype) plus one layer's full set while it is recomputed in backward; with `offload` the
    layer inputs live in pinned host memory (`cpu_offload_bytes`) and the GPU holds two layers' inputs (the one
    in use and the one being copied) plus the recomputed layer.
logits / loss
    Unfused (HF, ``fused: false``: the HF+PEFT baseline): the (T, V) logits in the compute dtype, the fp32
    log-softmax saved by cross-entropy and one
    fp32 (T, V) transient (the upcast in forward, the gradient in backward), plus the int64 labels. Fused
    (slimtune.ops.linear_cross_entropy): dx (T, hidden) kept for backward, fp32 row losses, the labels, and one
    (chunk, V) logits buffer in the head's dtype (overwritten in place by its gradient); the default chunk follows
    Liger's rule (about T / ceil(V / hidden) tokens, rounded up to a power of two: bounded by twice that). An NF4
    head streams through the loss one vocabulary block at a time: dx, row losses and labels per token plus the
    bounded block buffers of `slimtune.ops.linear_ce.stream_buffer_bytes`; no dense copy of the head.
dequant buffer
    Unfused 4-bit path: bitsandbytes dequantizes one weight at a time to the compute dtype (the largest one
    bounds it). Fused kernels dequantize tiles in registers: 0.
CUDA context
    A constant (0.5 GiB by default): the CUDA context and cuBLAS workspaces, which torch does not count as
    allocated memory but which the card must hold.

host memory (not in the GPU total)
    `host_bytes`: the pinned embedding table, an optimizer in host memory, the offloaded layer inputs (pinned blocks
    torch's host allocator keeps until the process ends: the largest step's stay held); and the peak
    while loading: streamed (`model.load: auto`), one checkpoint tensor in bf16 plus one fp32 quantization chunk;
    `model.load: full`, the whole model in the compute dtype plus one weight in fp32. Beyond the process's own RSS.

Not modelled: allocator fragmentation (reserved - allocated), the optimizer's transient buffers during `step`,
and attention masks (padding masks make HF's SDPA fall back to repeat_kv; the baseline assumes packed or
unpadded batches, as the benchmark uses).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from slimtune.adapters.base import Adapter, AdapterConfig, get_adapter_class, modes
from slimtune.bench.activations import (
    activation_bytes_per_token_per_layer,
    attention_mode,
    baseline_saved_bytes,
    family,
    layer_items,
    masked_layer,
    normalize_targets,
)
from slimtune.bench.configs import resolve_model_config
from slimtune.bench.estimate_view import format_table, to_json
from slimtune.bench.inventory import ModelInventory, inventory
from slimtune.bench.sizes import GB, GiB, dtype_bytes, optimizer_state_bytes, quantized_weight_bytes
from slimtune.errors import SlimtuneError
from slimtune.models.embeddings import TIED_HEAD_REASON
from slimtune.models.streaming import QUANT_CHUNK_VALUES
from slimtune.ops.linear_ce import MIN_CHUNK_LOGITS_BYTES, stream_buffer_bytes

__all__ = [
    "CHECKPOINTING", "GB", "GiB", "OPTIMIZERS", "QUANTS", "Estimate", "activation_bytes_per_token_per_layer",
    "adapted_layers", "baseline_saved_bytes", "estimate", "estimate_full", "estimate_loram", "format_table", "normalize_targets", "optimizer_state_bytes",
    "quantized_weight_bytes", "to_json",
]

QUANTS = ("none", "nf4", "fp4")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
CHECKPOINTING = ("none", "full", "offload")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SlimtuneError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def adapted_layers(num_layers: int, layers: Any = None) -> tuple[int, ...]:
    """Layer indices that carry adapters (the adapter config's own rule): all, a list, or {"first": n, "last": m}."""
    try:
        cfg = AdapterConfig(kind="lora", layers=layers)
        return tuple(cfg.layer_indices(num_layers))
    except ValueError as err:
        raise SlimtuneError(f"adapter layers: {err}".split("\n")[0]) from None


# --------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Peak GPU memory of one training step, by component (bytes). See the module docstring for the model."""

    model: str
    inputs: dict[str, Any]
    # parameters
    num_params: int
    adapter_params: int
    adapter_frozen_params: int
    # weights
    weights_linear_bytes: int
    weights_embed_bytes: int
    weights_other_bytes: int
    # adapter training state
    adapter_param_bytes: int
    adapter_grad_bytes: int
    optimizer_bytes: int
    # token-dependent terms (linear in tokens = micro_batch x seq_len)
    layer_input_bytes: int  # checkpointed layer inputs held on the GPU (0 without checkpointing)
    activation_bytes: int  # everything else autograd keeps: all layers, or the one being recomputed
    logits_bytes: int
    # constants
    dequant_bytes: int
    cuda_context_bytes: int
    # host memory (offloaded checkpoints), not part of the GPU total
    cpu_offload_bytes: int
    # the linear model: total = fixed_bytes + bytes_per_token * tokens
    fixed_bytes: int
    bytes_per_token: int
    activation_per_token_per_layer: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: Any = field(default=None, repr=False, compare=False)
    # eager attention: bytes per token and per position of the sequence (total += this x tokens x seq_len)
    bytes_per_token_seq: int = 0
    fused: bool = False  # the decoder runs fused (fuse_model fused every decoder module)
    loss_fused: bool = False  # the loss is the chunked linear CE
    unfused: list[tuple[str, str]] = field(default_factory=list)  # fuse_model's (module, why)
    # host memory beyond the process itself (not part of the GPU total): what stays there during training
    # (pinned embedding table, optimizer on the host, offloaded checkpoints), and the peak while loading the base
    host_bytes: dict[str, int] = field(default_factory=dict)
    host_load_peak_bytes: int = 0  # streamed load (model.load: auto/stream): one tensor + one quantization chunk
    host_load_full_bytes: int = 0  # from_pretrained in the compute dtype, then quantize (model.load: full)

    @property
    def loram(self) -> dict[str, Any] | None:
        return self.inputs.get("loram")

    @property
    def weights_bytes(self) -> int:
        return self.weights_linear_bytes + self.weights_embed_bytes + self.weights_other_bytes

    @property
    def tokens(self) -> int:
        return self.inputs["seq_len"] * self.inputs["micro_batch"]

    @property
    def total_bytes(self) -> int:
        return sum(self.components().values())

    def components(self) -> dict[str, int]:
        """GPU components in display order (bytes)."""
        return {
            "weights_linear": self.weights_linear_bytes,
            "weights_embed": self.weights_embed_bytes,
            "weights_other": self.weights_other_bytes,
            "adapter_params": self.adapter_param_bytes,
            "adapter_grads": self.adapter_grad_bytes,
            "optimizer": self.optimizer_bytes,
            "layer_inputs": self.layer_input_bytes,
            "activations": self.activation_bytes,
            "logits": self.logits_bytes,
            "dequant": self.dequant_bytes,
            "cuda_context": self.cuda_context_bytes,
        }

    def total_for(self, seq_len: int, micro_batch: int | None = None) -> int:
        """Total bytes at another sequence length (same everything else), from the linear model."""
        batch = self.inputs["micro_batch"] if micro_batch is None else micro_batch
        return self.fixed_bytes + (self.bytes_per_token + self.bytes_per_token_seq * seq_len) * seq_len * batch

    def fits(self, gpu_mem_gib: float | None = None) -> bool:
        return self.total_bytes <= _cap(self, gpu_mem_gib)

    def max_seq_len_that_fits(self, gpu_mem_gib: float | None = None) -> int:
        """Longest seq_len (at this micro_batch) whose total fits `gpu_mem_gib` GiB; 0 if none does."""
        cap = _cap(self, gpu_mem_gib)
        b = self.inputs["micro_batch"]
        per_seq, quad = self.bytes_per_token * b, self.bytes_per_token_seq * b
        if cap < self.fixed_bytes or per_seq <= 0:
            return 0
        room = cap - self.fixed_bytes
        if not quad:
            return room // per_seq  # total_for(seq) <= cap < total_for(seq + 1)
        s = int((-per_seq + math.sqrt(per_seq * per_seq + 4 * quad * room)) / (2 * quad))  # quad s² + per_seq s
        while s > 0 and quad * s * s + per_seq * s > room:
            s -= 1
        while quad * (s + 1) ** 2 + per_seq * (s + 1) <= room:
            s += 1
        return s

    def reestimate(self, **changes: Any) -> Estimate:
        """The same estimate with some inputs changed (what `advice` compares; a LoRAM estimate stays LoRAM)."""
        if self.inputs.get("kind") == "full":  # full fine-tuning: estimate_full's own inputs
            keys = ("modules", "optimizer", "optimizer_on", "compute_dtype", "seq_len", "micro_batch",
                    "grad_checkpointing", "gpu_mem_gib", "loram")
            return estimate_full(self.config, **{k: v for k, v in {**self.inputs, **changes}.items() if k in keys})
        return estimate(self.config, **{**self.inputs, **changes})

    def advice(self, gpu_mem_gib: float | None = None) -> list[str]:
        """What to lower or switch on when the step does not fit; empty when it fits."""
        cap = _cap(self, gpu_mem_gib)
        if self.total_bytes <= cap:
            return []
        cap_gib = cap / GiB
        inp = self.inputs
        tips: list[str] = []

        def alt(label: str, **changes: Any) -> None:
            other = self.reestimate(**changes, gpu_mem_gib=None)
            if other.total_bytes >= self.total_bytes:
                return
            verdict = "fits" if other.total_bytes <= cap else f"still over {cap_gib:.1f} GiB"
            tips.append(f"{label}: {other.total_bytes / GiB:.2f} GiB ({verdict})")

        if inp["grad_checkpointing"] == "none":
            alt("enable grad_checkpointing: full", grad_checkpointing="full")
        if inp["grad_checkpointing"] != "offload":
            alt("use grad_checkpointing: offload (layer inputs in pinned CPU memory)", grad_checkpointing="offload")
        if not inp["fused"]:
            alt("use the fused slimtune kernels (fused: true)", fused=True)
        if inp["optimizer"] == "adamw":
            alt("use optimizer: adamw8bit", optimizer="adamw8bit")
        if not inp.get("quantize_lm_head") and inp["quant"] != "none":
            alt("quantize the head (quant.quantize_lm_head: true, streamed through the loss)", quantize_lm_head=True)
        if inp.get("embeddings_on") != "cpu" and (inp.get("quantize_lm_head") or self.config is None
                                                  or not getattr(self.config, "tie_word_embeddings", False)):
            alt("keep the embedding table in host memory (train.embeddings_on: cpu)", embeddings_on="cpu")
        if inp["micro_batch"] > 1:
            alt(f"lower micro_batch {inp['micro_batch']} -> 1 (raise grad_accum to keep the batch)", micro_batch=1)
        best = self.max_seq_len_that_fits(gpu_mem_gib)
        if 0 < best < inp["seq_len"]:
            tips.append(f"lower seq_len to {best} or less (longest that fits at micro_batch {inp['micro_batch']})")
        if inp["rank"] > 8 and inp["adapter_params"] is None:
            alt(f"lower adapter rank {inp['rank']} -> {inp['rank'] // 2}", rank=inp["rank"] // 2)
        if inp["quant"] == "none":
            alt("quantize the base (quant: nf4)", quant="nf4")
        if self.fixed_bytes > cap:
            tips.append(
                f"the weights, adapter state and constants alone need {self.fixed_bytes / GiB:.2f} GiB: "
                f"use a smaller model or a larger GPU"
            )
        return tips


def _cap(est: Estimate, gpu_mem_gib: float | None) -> int:
    gib = est.inputs.get("gpu_mem_gib") if gpu_mem_gib is None else gpu_mem_gib
    if gib is None:
        raise SlimtuneError("no GPU memory given: pass gpu_mem_gib (e.g. --gpu-mem 24)")
    return int(gib * GiB)


def estimate(
    config: Any,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Any = "bfloat16",
    adapter_params: int | Callable[[Any], int] | None = None,
    kind: str = "lora",
    rank: int = 16,
    targets: Any = None,
    layers: Any = None,
    adapter_dtype: Any = "float32",
    lora_dropout: float = 0.0,
    optimizer: str = "adamw",
    seq_len: int = 2048,
    micro_batch: int = 1,
    grad_checkpointing: str = "full",
    fused: bool = True,
    gpu_mem_gib: float | None = None,
    quantize_lm_head: bool = False,
    ce_chunk_tokens: int | None = None,
    cuda_context_gib: float = 0.5,
    adapter_options: dict[str, Any] | None = None,
    loram: dict[str, Any] | None = None,
    embeddings_on: str = "gpu",
    optimizer_on: str = "device",
) -> Estimate:
    """Estimate peak GPU memory of one (Q)LoRA training step.

    `config`: a transformers config, or anything `resolve_model_config` accepts (hub id, folder, GGUF, built-in
    name). `kind` is any registered adapter kind; `rank`, `targets` (module names, roles such as "q", `re:`
    regexes or "all-linear"), `layers`, `lora_dropout` and `adapter_options` (the kind's other config fields, e.g.
    alpha, modules_to_save) build its adapter config, which is injected on a meta-device copy of the model.
    `adapter_params`: an explicit trainable count (int, or a callable given the config) overriding the injected
    one. `fused`: what the recipe asks for; the estimate is fused only where `fuse_model` fuses. `loram`:
    {ratio, keep_first, keep_last}: the step on the LoRAM-pruned model. `seq_len` x `micro_batch` tokens per step.
    """
    if layers is not None and hasattr(layers, "model_dump"):  # a recipe's LayerRange
        layers = layers.model_dump()
    inputs = dict(
        quant=quant, double_quant=double_quant, compute_dtype=compute_dtype, adapter_params=adapter_params,
        kind=kind, rank=rank, targets=targets, layers=layers, adapter_dtype=adapter_dtype,
        lora_dropout=lora_dropout, optimizer=optimizer, seq_len=seq_len, micro_batch=micro_batch,
        grad_checkpointing=grad_checkpointing, fused=fused, gpu_mem_gib=gpu_mem_gib,
        quantize_lm_head=quantize_lm_head, ce_chunk_tokens=ce_chunk_tokens, cuda_context_gib=cuda_context_gib,
        adapter_options=dict(adapter_options or {}), loram=dict(loram) if loram else None,
        embeddings_on=embeddings_on, optimizer_on=optimizer_on,
    )
    if isinstance(config, str) or hasattr(config, "__fspath__"):
        model_name = os.fspath(config)
        config = resolve_model_config(config)
    else:
        model_name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    _choice("quant", quant, QUANTS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("grad_checkpointing", grad_checkpointing, CHECKPOINTING)
    _choice("embeddings_on", embeddings_on, ("gpu", "cpu"))
    _choice("optimizer_on", optimizer_on, ("device", "cpu"))
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("rank", rank),
                        ("ce_chunk_tokens", 1 if ce_chunk_tokens is None else ce_chunk_tokens)):
        if int(value) != value or value < 1:
            raise SlimtuneError(f"{name}={value!r}: expected a positive integer")
    dtype_name, d = dtype_bytes(compute_dtype)
    adapter_dtype_name, a = dtype_bytes(adapter_dtype)
    inputs["compute_dtype"], inputs["adapter_dtype"] = dtype_name, adapter_dtype_name
    spec = family(config)
    acfg = _adapter_config(spec, kind, rank, targets, layers, lora_dropout, inputs["adapter_options"])
    inv = inventory(config, acfg, fuse=fused, loram=loram)
    inputs["targets"] = [p for p in spec.proj_names if any(ad.proj == p for li in inv.layers for ad in li.adapters)]
    notes = _notes(inv, fused, kind, loram)

    # ---- weights --------------------------------------------------------------------------------------------
    numels = [n for li in inv.layers for n in li.linear]
    if quant == "none":
        linear = sum(numels) * d
    else:
        linear = sum(quantized_weight_bytes(n, double_quant=double_quant) for n in numels)
    lm_head_params = inv.lm_head_params
    head_nf4 = quantize_lm_head and quant != "none"
    host: dict[str, int] = {}
    if head_nf4:  # a tied head gets its own NF4 copy; the (dense) table stays for the lookup
        linear += quantized_weight_bytes(lm_head_params or inv.embed_params, double_quant=double_quant)
    head_dense = 0 if head_nf4 else lm_head_params * d
    if embeddings_on == "cpu":
        if not lm_head_params and not head_nf4:
            raise SlimtuneError(f"train.embeddings_on: cpu: {TIED_HEAD_REASON}")
        host["embedding table (pinned)"] = inv.embed_params * d
        embed = head_dense
        geo0 = spec.geometry(config)
        notes.append(f"embeddings_on: cpu: the rows of each step travel to the GPU ({geo0.hidden * d:,} B per token)")
    else:
        embed = inv.embed_params * d + head_dense
    other = inv.other_params * d

    # ---- adapter state --------------------------------------------------------------------------------------
    trainable, frozen = inv.adapter_trainable, inv.adapter_frozen
    if adapter_params is not None:
        n_adapter = int(adapter_params(config) if callable(adapter_params) else adapter_params)
        trainable = [n_adapter]  # one block of values: the 8-bit optimizer threshold is not applied per tensor
        notes.append("adapter parameter count given explicitly; rank/targets only size the (T, r) activations")
    n_trainable, n_frozen = sum(trainable), sum(frozen)
    adapter_param_bytes = (n_trainable + n_frozen) * a
    adapter_grad_bytes = n_trainable * a
    masters = adapter_dtype_name != "float32" or optimizer_on == "cpu"
    if masters:  # slimtune.train.optim.MasterWeights: fp32 masters; the inner optimizer's state is fp32 too
        optim_bytes = 4 * n_trainable + optimizer_state_bytes(trainable, optimizer, 4)
    else:
        optim_bytes = optimizer_state_bytes(trainable, optimizer, a)
    if optimizer != "adamw" and trainable:
        optim_bytes += 2 * 256 * 4  # the two shared 256-entry quantization maps
    if optimizer_on == "cpu":
        host["optimizer: fp32 masters + state"], optim_bytes = optim_bytes, 0
    if optimizer == "paged_adamw8bit":
        notes.append("paged optimizer state can be evicted to CPU under memory pressure; counted on the GPU here")

    # ---- activations (per token) ----------------------------------------------------------------------------
    act = _activations(inv, d, a, lora_dropout, grad_checkpointing, seq_len, micro_batch)
    # ---- logits / loss --------------------------------------------------------------------------------------
    geo = spec.geometry(config)
    logits_fixed, logits_per_token = _logits(inv.loss_fused, geo.hidden, geo.vocab, d, ce_chunk_tokens)
    if head_nf4 and inv.loss_fused:
        # the NF4 head streams through the loss one vocabulary block at a time (slimtune.ops.linear_ce): dx kept
        # for backward, row losses, labels per token; the block, its logits and the chunk's accumulators are
        # bounded (their size at the largest chunk)
        logits_per_token = geo.hidden * d + 4 + 8
        logits_fixed = stream_buffer_bytes(1 << 40, geo.hidden, geo.vocab, d)
    if not inv.loss_fused and spec.final_softcap(config) is not None:
        logits_per_token += geo.vocab * d  # HF's cap · tanh(z / cap) keeps the tanh output

    # ---- constants ------------------------------------------------------------------------------------------
    dequant = 0
    if quant != "none" and not inv.decoder_fused:
        largest = max(numels, default=0)
        if quantize_lm_head and lm_head_params:
            largest = max(largest, lm_head_params)
        dequant = largest * d
    elif head_nf4 and not inv.loss_fused:
        dequant = (lm_head_params or inv.embed_params) * d  # HF's lm_head dequantizes the whole head
    context = int(cuda_context_gib * GiB)

    if act["offload"]:
        host["offloaded layer inputs (pinned)"] = act["offload"] * seq_len * micro_batch
    biggest = max(numels + [inv.embed_params, lm_head_params], default=0)
    load_peak = 2 * biggest + 4 * min(biggest, QUANT_CHUNK_VALUES)  # the bf16 tensor read + its fp32 chunk
    load_full = inv.num_params * d + 4 * max(numels, default=0)  # the whole model + one weight's fp32 copy
    tokens = seq_len * micro_batch
    fixed = linear + embed + other + adapter_param_bytes + adapter_grad_bytes + optim_bytes + logits_fixed
    fixed += dequant + context
    return Estimate(
        model=str(model_name) + ("" if not loram else f" pruned at ratio {float(loram['ratio']):g} (LoRAM)"),
        inputs=inputs, num_params=inv.num_params, adapter_params=n_trainable, adapter_frozen_params=n_frozen,
        weights_linear_bytes=linear, weights_embed_bytes=embed, weights_other_bytes=other,
        adapter_param_bytes=adapter_param_bytes, adapter_grad_bytes=adapter_grad_bytes, optimizer_bytes=optim_bytes,
        layer_input_bytes=act["inputs"] * tokens,
        activation_bytes=(act["per_token"] + act["per_token_seq"] * seq_len) * tokens,
        logits_bytes=logits_fixed + logits_per_token * tokens, dequant_bytes=dequant, cuda_context_bytes=context,
        cpu_offload_bytes=act["offload"] * tokens, fixed_bytes=fixed,
        bytes_per_token=act["inputs"] + act["per_token"] + logits_per_token,
        bytes_per_token_seq=act["per_token_seq"], activation_per_token_per_layer=act["typical"], notes=notes,
        config=config, fused=inv.decoder_fused, loss_fused=inv.loss_fused, unfused=list(inv.fuse_unfused),
        host_bytes=host, host_load_peak_bytes=load_peak, host_load_full_bytes=load_full,
    )


def estimate_loram(config: Any, *, ratio: float, keep_first: int = 0, keep_last: int = 0, **kwargs: Any) -> Estimate:
    """``estimate`` of the LoRAM-pruned model: `config` is the ORIGINAL model's; the pruned geometry is the one
    ``slimtune.loram.prune.prune_model`` produces (run on the meta device)."""
    kwargs.pop("loram", None)
    return estimate(config, loram={"ratio": ratio, "keep_first": keep_first, "keep_last": keep_last}, **kwargs)


def _adapter_config(spec, kind: str, rank: int, targets: Any, layers: Any, dropout: float, options: dict):
    """The kind's own adapter config, validated by the registry (what a recipe's ``adapter:`` block becomes)."""
    if kind in modes():
        raise SlimtuneError(f"adapter.kind: {kind!r} is a training mode (the model's own weights train), not an "
                            "adapter kind; the estimator sizes adapter training only")
    try:
        cls = get_adapter_class(kind)
    except KeyError as err:
        raise SlimtuneError(f"adapter kind: {err.args[0]}") from None
    if targets is None or targets in ("all", "all-linear", "all_linear"):
        tgt: Any = "all-linear"
    else:
        items = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
        plain = [t for t in items if not t.startswith("re:")]
        tgt = list(normalize_targets(plain, spec)) + [t for t in items if t.startswith("re:")] if plain else items
    try:
        return cls.Config.model_validate({**options, "kind": kind, "rank": rank, "targets": tgt, "layers": layers,
                                          "dropout": dropout})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise SlimtuneError(f"adapter.{where}: {first['msg']}") from None


def _notes(inv: ModelInventory, fused: bool, kind: str, loram: dict | None) -> list[str]:
    notes: list[str] = []
    if loram:
        geo = inv.spec.geometry(inv.config)
        pruned = [li.geometry for i, li in enumerate(inv.layers) if inv.kept is not None and i in inv.kept.layers]
        if pruned:
            notes.append(f"LoRAM: {len(pruned)} pruned layers keep {pruned[0].kv_heads}/{geo.kv_heads} KV heads and "
                         f"{pruned[0].intermediate}/{geo.intermediate} MLP neurons (ratio {loram['ratio']}); "
                         f"{len(inv.layers) - len(pruned)} layers intact")
    if fused and inv.unfused_decoder:
        name, why = inv.unfused_decoder[0]
        notes.append(f"fuse_model leaves {len(inv.unfused_decoder)} decoder module(s) unfused ({name}: {why}): the "
                     "decoder is sized as HF+PEFT, what the trainer runs")
    if fused and not inv.loss_fused:
        why = dict(inv.fuse_unfused).get("lm_head+loss", "")
        notes.append(f"loss not fused ({why}): full logits counted")
    if get_adapter_class(kind).plan.__func__ is not Adapter.plan.__func__:
        notes.append(f"{kind}: adapter tensors from the kind's meta-device plan (per-module ranks that depend on the "
                     "weights' spectrum are uniform there; the total budget is the same)")
    if inv.extra_trainable:
        notes.append(f"modules_to_save: {sum(inv.extra_trainable):,} parameters train in full (counted in adapter "
                     "params)")
    return notes


def _activations(inv: ModelInventory, d: int, a: int, dropout: float, ckpt: str, seq_len: int,
                 micro_batch: int) -> dict[str, Any]:
    """Per-token activation terms: checkpointed inputs, everything else, the eager-attention term, host offload."""
    spec, fused = inv.spec, inv.decoder_fused
    eager, softcap = attention_mode(spec, inv.config)
    adapted = inv.adapted_layers
    first = adapted[0] if adapted else len(inv.layers)
    totals, quads, typical = [], [], {}
    for i, li in enumerate(inv.layers):
        if i < first:  # nothing before the first adapter needs a gradient
            totals.append(0)
            quads.append(0)
            continue
        ranks = {ad.proj: ad.rank for ad in li.adapters}
        items, quad = layer_items(spec, li.geometry, ranks, fused=fused, compute_bytes=d, adapter_bytes=a,
                                  lora_dropout=dropout, input_requires_grad=i != first, device="cuda", eager=eager,
                                  softcap=softcap, masked=masked_layer(spec, inv.config, i, seq_len))
        totals.append(sum(items.values()))
        quads.append(sum(quad.values()))
        if li.adapters and (i != first or not typical):
            typical = {**items, **{k: v * seq_len for k, v in quad.items()}}
    heaviest = max(range(len(totals)), key=lambda i: totals[i] + quads[i] * seq_len, default=None)
    hidden = spec.geometry(inv.config).hidden
    layer_input = hidden * d  # what a checkpoint keeps per layer and token
    live = len(inv.layers) - first
    # cos, sin: (1, T, head_dim) per RoPE set, shared by all layers and by the batch's rows (per token: / batch)
    rope = math.ceil(2 * spec.geometry(inv.config).head_dim * d * spec.rope_sets(inv.config) / micro_batch)
    final_norm = (hidden * d + 4) if fused else (hidden * 4 + 4)  # the final norm keeps its input
    out = {"inputs": 0, "offload": 0, "typical": typical}
    if ckpt == "none":
        out["per_token"], out["per_token_seq"] = sum(totals) + rope + final_norm, sum(quads)
    else:
        h = 0 if heaviest is None else totals[heaviest]
        out["per_token"], out["per_token_seq"] = h + rope + final_norm, 0 if heaviest is None else quads[heaviest]
        out["inputs"] = (live if ckpt == "full" else min(2, live)) * layer_input
        out["offload"] = live * layer_input if ckpt == "offload" else 0
    return out


def _logits(fused: bool, hidden: int, vocab: int, d: int, ce_chunk_tokens: int | None) -> tuple[int, int]:
    """(fixed, per-token) bytes of the logits / loss."""
    if not fused:
        return 0, vocab * (d + 4 + 4) + 8
    # slimtune.ops.linear_cross_entropy: dx (T, hidden) kept for backward, fp32 row losses, int64 labels, and
    # one (chunk, V) logits buffer in the head's dtype, overwritten in place by the gradient.
    per_token = hidden * d + 4 + 8
    if ce_chunk_tokens is not None:
        return ce_chunk_tokens * vocab * d, per_token
    # Liger's rule: chunk = T / ceil(V / hidden) rounded up to a power of two (< 2x): bounded by 2x, plus the
    # 64 MiB-of-fp32-logits floor of default_chunk_size (counted additively: conservative).
    return 2 * MIN_CHUNK_LOGITS_BYTES * d // 4, per_token + math.ceil(2 * vocab * d / math.ceil(vocab / hidden))


# --------------------------------------------------------------------------------------------------------------
# From a recipe
def estimate_full(config: Any, *, modules: Any = "no-embeddings", optimizer: str = "adamw",
                  optimizer_on: str = "device", compute_dtype: Any = "bfloat16", **kwargs: Any) -> Estimate:
    """Full fine-tuning (``adapter.kind: full``): a dense base whose own weights train. Activations and logits are
    a rank-1 all-linear LoRA's on the same dense base (its adapters save every linear's input, which is what the
    weight gradients need); the adapter terms become the trained weights' gradients (compute dtype), fp32 master
    copies (``MasterWeights``, when the weights are not fp32) and the optimizer state, on the GPU or (``optimizer_on:
    cpu``) in host memory. ``modules``: all-linear (decoder linears), no-embeddings, all; a pattern list is sized as
    no-embeddings (noted)."""
    base = estimate(config, quant="none", kind="lora", rank=1, targets="all-linear", optimizer=optimizer,
                    compute_dtype=compute_dtype, fused=False, **kwargs)  # the decoder runs unfused (HF modules)
    loss = estimate(config, quant="none", kind="lora", rank=1, targets="all-linear", optimizer=optimizer,
                    compute_dtype=compute_dtype, fused=True, **kwargs)  # but the loss is the chunked linear CE
    base = replace(base, logits_bytes=loss.logits_bytes, loss_fused=loss.loss_fused,
                   bytes_per_token=base.bytes_per_token + (loss.logits_bytes - base.logits_bytes) // base.tokens)
    d = dtype_bytes(compute_dtype)[1]
    inv_linear = base.weights_linear_bytes // d
    embed_params = base.weights_embed_bytes // d
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    notes = [n for n in base.notes if "adapter" not in n]
    if modules == "all-linear":
        n_trained = inv_linear
    elif modules == "all":
        n_trained = base.num_params
    else:
        if modules != "no-embeddings":
            notes.append(f"adapter.modules {modules!r}: sized as no-embeddings")
        input_embed = embed_params if tied else embed_params // 2  # untied: embed_tokens and lm_head are equal
        n_trained = base.num_params - input_embed
    grads = n_trained * d
    masters = 4 * n_trained if d != 4 else 0
    state = optimizer_state_bytes([n_trained], optimizer, 4) + (2 * 256 * 4 if optimizer != "adamw" else 0)
    on_host = optimizer_on == "cpu"
    notes.append(f"full fine-tuning: {n_trained:,} trained values; fp32 masters {masters / GiB:.2f} GiB + optimizer "
                 f"state {state / GiB:.2f} GiB " + ("in host memory (optimizer_on: cpu)" if on_host else "on the GPU"))
    optim = 0 if on_host else masters + state
    fixed = base.fixed_bytes - base.adapter_param_bytes - base.adapter_grad_bytes - base.optimizer_bytes
    return replace(base, adapter_params=n_trained, adapter_frozen_params=0, adapter_param_bytes=0,
                   adapter_grad_bytes=grads, optimizer_bytes=optim, fixed_bytes=fixed + grads + optim, notes=notes,
                   inputs={**base.inputs, "kind": "full", "modules": modules, "optimizer_on": optimizer_on,
                           "adapter_dtype": dtype_bytes(compute_dtype)[0]})
