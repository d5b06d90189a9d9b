"""Peak GPU memory of a (Q)LoRA training step, from the model config alone, component by component.

Every term is an explicit byte count; the ones that grow with the batch are linear in the number of tokens
(micro_batch x seq_len), so the longest sequence that fits a memory cap is solved in closed form. The model:

weights
    Linear weights of the decoder layers: compute dtype (quant "none") or 4-bit (nf4/fp4, bitsandbytes layout):
    two codes per byte, one absmax per block of 64; with double quant the absmax are uint8 codes with one fp32
    second-level absmax per 256 blocks and an fp32 offset, so 0.5 + 1/64 + 4/16384 = 0.5159 byte per parameter,
    plus per-weight code tables (16 fp32 NF4 codes, 256 fp32 second-level codes). Embeddings, lm_head (unless
    `quantize_lm_head`), norms and biases stay in the compute dtype.
adapter params / grads / optimizer
    Trainable adapter tensors in `adapter_dtype` (fp32 by default: 4 B), their gradients (same dtype), AdamW's two
    moments (2 x adapter dtype), 8-bit AdamW's two uint8 moments + one fp32 absmax per 256 values and moment
    (bitsandbytes keeps tensors under 4,096 values in 32-bit state). Frozen adapter tensors (LaMDA's A,
    IntTune's A and B) count as params only.
activations
    What autograd keeps for backward, per token per layer (see `activation_bytes_per_token_per_layer`), times the
    layers that keep it: all of them without checkpointing; with `full` checkpointing each layer's input
    (hidden x compute dtype) plus one layer's full set while it is recomputed in backward; with `offload` the
    layer inputs live in pinned host memory (`cpu_offload_bytes`) and the GPU holds two layers' inputs (the one
    in use and the one being copied) plus the recomputed layer.
logits / loss
    Unfused (HF): the (T, V) logits in the compute dtype, the fp32 log-softmax saved by cross-entropy and one
    fp32 (T, V) transient (the upcast in forward, the gradient in backward), plus the int64 labels. Fused
    (slimtune.ops.linear_cross_entropy): dx (T, hidden) kept for backward, fp32 row losses, the labels, and one
    (chunk, V) logits buffer in the head's dtype (overwritten in place by its gradient); the default chunk follows
    Liger's rule (about T / ceil(V / hidden) tokens, rounded up to a power of two: bounded by twice that).
dequant buffer
    Unfused 4-bit path: bitsandbytes dequantizes one weight at a time to the compute dtype (the largest one
    bounds it). Fused kernels dequantize tiles in registers: 0.
CUDA context
    A constant (0.5 GiB by default): the CUDA context and cuBLAS workspaces, which torch does not count as
    allocated memory but which the card must hold.

Not modelled: allocator fragmentation (reserved - allocated), the optimizer's transient buffers during `step`,
and attention masks (padding masks make HF's SDPA fall back to repeat_kv; the baseline assumes packed or
unpadded batches, as the benchmark uses).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from slimtune.bench.configs import (
    PROJECTIONS,
    head_dim,
    linear_shapes,
    parameter_counts,
    resolve_model_config,
)
from slimtune.errors import SlimtuneError

GiB = 1024**3
GB = 1000**3

QUANTS = ("none", "nf4", "fp4")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
CHECKPOINTING = ("none", "full", "offload")
ADAPTER_KINDS = ("lora", "rslora", "dora", "lamda", "slora", "nlora", "inttune")

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "fp16": 2, "half": 2,
}
_DTYPE_NAME = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

_TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}

#: bitsandbytes: 8-bit optimizer state only for tensors with at least this many values.
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes 8-bit optimizer block size (one fp32 absmax per block and moment).
BNB_OPTIM_BLOCK = 256
#: bitsandbytes 4-bit block size and double-quant second-level block size.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


def _dtype(value: Any) -> tuple[str, int]:
    """Normalise a dtype given as torch.dtype or string to (name, bytes)."""
    name = str(value).removeprefix("torch.").lower()
    name = _DTYPE_NAME.get(name, name)
    if name not in _DTYPE_BYTES:
        raise SlimtuneError(f"dtype {value!r}: expected one of float32, bfloat16, float16")
    return name, _DTYPE_BYTES[name]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SlimtuneError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def normalize_targets(targets: str | Collection[str] | None) -> tuple[str, ...]:
    """Target projection names (q/k/v/o/gate/up/down, with or without `_proj`; "all-linear" = all seven)."""
    if targets is None or targets in ("all", "all-linear", "all_linear"):
        return PROJECTIONS
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        name = _TARGET_ALIASES.get(t, t)
        if name not in PROJECTIONS:
            raise SlimtuneError(f"adapter target {t!r}: expected some of {', '.join(PROJECTIONS)}")
        if name not in out:
            out.append(name)
    return tuple(p for p in PROJECTIONS if p in out)


def adapted_layers(num_layers: int, layers: Any = None) -> tuple[int, ...]:
    """Layer indices that carry adapters: all, an explicit list, or LayRA's {"first": n, "last": m}."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, Mapping):
        first, last = int(layers.get("first", 0)), int(layers.get("last", 0))
        chosen = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    else:
        chosen = {int(i) for i in layers}
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise SlimtuneError(f"adapter layers {sorted(bad)}: the model has layers 0..{num_layers - 1}")
    return tuple(sorted(chosen))


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def quantized_weight_bytes(numel: int, *, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit (nf4/fp4) weight of `numel` values, quant state included."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the 16-entry NF4/FP4 code table (fp32), one per QuantState
    if not double_quant:
        return packed + 4 * blocks + code
    second = math.ceil(blocks / NF4_DQ_BLOCK)
    # uint8 absmax codes + fp32 second-level absmax + fp32 offset + 256-entry fp32 code of the nested state
    return packed + blocks + 4 * second + 4 + code + 256 * 4


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------


def adapter_tensors(in_f: int, out_f: int, rank: int, kind: str = "lora") -> tuple[list[int], list[int]]:
    """(trainable, frozen) tensor sizes one adapter adds to one (out, in) linear."""
    r = rank
    if kind in ("lora", "rslora"):
        return [r * in_f, out_f * r], []
    if kind == "dora":
        return [r * in_f, out_f * r, out_f], []
    if kind in ("slora", "nlora"):
        return [r * in_f, r * r, out_f * r], []
    if kind == "lamda":  # A frozen; S and (early in training) B trainable
        return [r * r, out_f * r], [r * in_f]
    if kind == "inttune":  # only N trains
        return [r * r], [r * in_f, out_f * r]
    raise SlimtuneError(f"adapter kind {kind!r}: expected one of {', '.join(ADAPTER_KINDS)}")


def optimizer_state_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> int:
    """Optimizer state for trainable tensors of the given sizes."""
    total = 0
    for n in sizes:
        if optimizer == "adamw":
            total += 2 * n * param_bytes  # exp_avg, exp_avg_sq in the parameter dtype
        elif n < BNB_MIN_8BIT_SIZE:
            total += 2 * n * 4  # bitsandbytes falls back to 32-bit state
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
    return total


# --------------------------------------------------------------------------------------------------------------
# Activations: bytes saved for backward per token per layer
# --------------------------------------------------------------------------------------------------------------


def activation_bytes_per_token_per_layer(
    config,
    *,
    fused: bool,
    compute_dtype: Any = "bfloat16",
    adapter_dtype: Any = "float32",
    rank: int = 16,
    targets: Any = None,
    lora_dropout: float = 0.0,
    input_requires_grad: bool = True,
    device: str = "cuda",
) -> dict[str, int]:
    """What one decoder layer keeps for backward, per token, item by item (bytes). Sum the values for the total.

    Unfused = HF transformers Llama/Qwen2 decoder layer + PEFT LoRA Linear, SDPA attention, no padding mask
    (what `transformers` and `peft` save, read from LlamaDecoderLayer, LlamaRMSNorm, apply_rotary_pos_emb,
    sdpa_attention_forward and peft's lora.Linear.forward / bnb Linear4bit.forward):

    - RMSNorm: `x.to(float32)` is saved by pow and mul (the input itself when the compute dtype is fp32) and
      rsqrt(var + eps) per row (fp32); `weight * x_hat` saves only the frozen weight.
    - A frozen base linear (nn.Linear or bnb MatMul4Bit) keeps no activation; PEFT's lora_A keeps its input:
      the shared normed input when adapter and compute dtype agree and there is no dropout; otherwise the
      `x.to(adapter_dtype)` copy (one per adapted projection) or the dropout output plus its bool mask.
      lora_B keeps the (T, r) product A x.
    - RoPE keeps only cos/sin (shared by all layers: counted once per model).
    - SDPA (flash / efficient / CPU flash) keeps q, k, v, out (with native GQA: k and v at KV-head size) and the
      fp32 logsumexp per head. o_proj's input is SDPA's output (same storage).
    - SwiGLU MLP: SiLU keeps e = gate(x); the product keeps silu(e) and g = up(x); down's lora_A keeps the
      product (or its cast copy).

    Fused = slimtune's Functions (DESIGN §3): RMSNorm (frozen weight, `FusedRMSNorm`) keeps its output and the
    fp32 inverse RMS per row, and that output is the very tensor the qkv / MLP Function keeps as its X, so a norm
    costs only its inverse RMS; the qkv Function keeps X once; RoPE keeps nothing per layer; attention keeps q, k,
    v, out, logsumexp; o keeps its input (the attention output, same storage); the LoRA MLP Function keeps X,
    e = gate(X), g = up(X); every adapted projection also keeps its (T, r) product X Aᵀ. (Checked against
    saved_tensors_hooks in tests/bench/test_estimate_vs_measured.py: exact per layer.)

    LoRA dropout (p > 0) replaces the shared input by, per adapted projection, the dropout output (saved by
    lora_A) and what dropout keeps: a bool mask on CUDA (fused dropout kernel, 1 B/value), the float noise tensor
    in the input's dtype elsewhere (`device="cpu"`: what a CPU measurement sees).

    `input_requires_grad=False` is the first adapted layer when nothing before it trains (the frozen embedding
    output needs no gradient, so the input RMSNorm keeps nothing).
    """
    _, d = _dtype(compute_dtype)
    _, a = _dtype(adapter_dtype)
    f32 = 4
    mask = 1 if str(device).startswith("cuda") else a  # what dropout keeps per value
    targets = normalize_targets(targets)
    shapes = linear_shapes(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    q_out, kv_out = heads * hd, kv_heads * hd
    items: dict[str, int] = {}

    if fused:
        items["input_norm (inv_rms)"] = f32 if input_requires_grad else 0
        items["qkv input (= input_norm output)"] = hidden * d
        items["attention q,k,v,out"] = (2 * q_out + 2 * kv_out) * d
        items["attention logsumexp"] = heads * f32
        items["post_attention_norm (inv_rms)"] = f32
        items["mlp input (= post_attention_norm output)"] = hidden * d
        items["mlp e=gate(x), g=up(x)"] = 2 * inter * d
        items["lora x·Aᵀ (T, r)"] = len(targets) * rank * d
        return items

    direct = a == d and lora_dropout == 0.0  # lora_A keeps the very tensor the base layer received

    def lora_inputs(projs: tuple[str, ...], input_needs_grad: bool = True) -> int:
        """Input copies the adapted `projs` add beyond a shared input (which the caller counts)."""
        total = 0
        for p in projs:
            if p not in targets:
                continue
            in_f = shapes[p][1]
            if lora_dropout > 0.0:
                # dropout output (adapter dtype), and its mask / noise when a gradient flows back through it
                total += in_f * a + (in_f * mask if input_needs_grad else 0)
            elif a != d:
                total += in_f * a  # x.to(adapter_dtype)
        return total

    attn_in = ("q_proj", "k_proj", "v_proj")
    mlp_in = ("gate_proj", "up_proj")
    items["input_norm (x fp32, rsqrt)"] = (hidden * f32 + f32) if input_requires_grad else 0
    items["qkv input (shared)"] = hidden * d if direct and any(p in targets for p in attn_in) else 0
    items["qkv lora input copies"] = lora_inputs(attn_in, input_requires_grad)
    items["attention q,k,v,out"] = (2 * q_out + 2 * kv_out) * d
    items["attention logsumexp"] = heads * f32
    items["o lora input copy"] = lora_inputs(("o_proj",))
    items["post_attention_norm (h fp32, rsqrt)"] = hidden * f32 + f32
    items["mlp input (shared)"] = hidden * d if direct and any(p in targets for p in mlp_in) else 0
    items["gate/up lora input copies"] = lora_inputs(mlp_in)
    items["mlp e, silu(e), g"] = 3 * inter * d
    items["down input"] = inter * d if direct and "down_proj" in targets else 0
    items["down lora input copy"] = lora_inputs(("down_proj",))
    items["lora A·x (T, r)"] = len(targets) * rank * a
    return items


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
        return self.fixed_bytes + self.bytes_per_token * seq_len * batch

    def fits(self, gpu_mem_gib: float | None = None) -> bool:
        return self.total_bytes <= _cap(self, gpu_mem_gib)

    def max_seq_len_that_fits(self, gpu_mem_gib: float | None = None) -> int:
        """Longest seq_len (at this micro_batch) whose total fits `gpu_mem_gib` GiB; 0 if none does."""
        cap = _cap(self, gpu_mem_gib)
        per_seq = self.bytes_per_token * self.inputs["micro_batch"]
        if cap < self.fixed_bytes or per_seq <= 0:
            return 0
        return (cap - self.fixed_bytes) // per_seq  # total_for(seq) <= cap < total_for(seq + 1)

    def reestimate(self, **changes: Any) -> Estimate:
        """The same estimate with some inputs changed (what `advice` compares; LoRAM overrides it)."""
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
) -> Estimate:
    """Estimate peak GPU memory of one (Q)LoRA training step.

    `config`: a transformers config, or anything `resolve_model_config` accepts (hub id, folder, GGUF, built-in
    name). `adapter_params`: the trainable adapter parameter count (int, or a callable given the config);
    when omitted it is computed from `kind`/`rank`/`targets`/`layers` (LoRA: r·(in + out) per adapted linear).
    `rank`/`targets` also size the small (T, r) activations. `seq_len` x `micro_batch` tokens per step.
    """
    inputs = dict(
        quant=quant, double_quant=double_quant, compute_dtype=compute_dtype, adapter_params=adapter_params,
        kind=kind, rank=rank, targets=targets, layers=layers, adapter_dtype=adapter_dtype,
        lora_dropout=lora_dropout, optimizer=optimizer, seq_len=seq_len, micro_batch=micro_batch,
        grad_checkpointing=grad_checkpointing, fused=fused, gpu_mem_gib=gpu_mem_gib,
        quantize_lm_head=quantize_lm_head, ce_chunk_tokens=ce_chunk_tokens, cuda_context_gib=cuda_context_gib,
    )
    if isinstance(config, str) or hasattr(config, "__fspath__"):
        model_name = os.fspath(config)
        config = resolve_model_config(config)
    else:
        model_name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    _choice("quant", quant, QUANTS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("grad_checkpointing", grad_checkpointing, CHECKPOINTING)
    _choice("kind", kind, ADAPTER_KINDS)
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("rank", rank),
                        ("ce_chunk_tokens", 1 if ce_chunk_tokens is None else ce_chunk_tokens)):
        if int(value) != value or value < 1:
            raise SlimtuneError(f"{name}={value!r}: expected a positive integer")
    dtype_name, d = _dtype(compute_dtype)
    adapter_dtype_name, a = _dtype(adapter_dtype)
    inputs["compute_dtype"], inputs["adapter_dtype"] = dtype_name, adapter_dtype_name
    targets = normalize_targets(targets)
    inputs["targets"] = list(targets)

    counts = parameter_counts(config)
    shapes = linear_shapes(config)
    L, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    notes: list[str] = []

    # ---- weights --------------------------------------------------------------------------------------------
    if quant == "none":
        linear = counts["linear_weights"] * d
    else:
        linear = L * sum(quantized_weight_bytes(o * i, double_quant=double_quant) for o, i in shapes.values())
    lm_head_params = counts["lm_head"]
    if quantize_lm_head and quant != "none" and lm_head_params:
        linear += quantized_weight_bytes(lm_head_params, double_quant=double_quant)
        embed = counts["embed_tokens"] * d
    else:
        embed = (counts["embed_tokens"] + lm_head_params) * d
    other = (L * (counts["per_layer_norms"] + counts["per_layer_bias"]) + counts["final_norm"]) * d

    # ---- adapter state --------------------------------------------------------------------------------------
    chosen_layers = adapted_layers(L, layers)
    trainable: list[int] = []
    frozen: list[int] = []
    for _ in chosen_layers:
        for p in targets:
            out_f, in_f = shapes[p]
            t, fz = adapter_tensors(in_f, out_f, rank, kind)
            trainable += t
            frozen += fz
    if adapter_params is not None:
        n_adapter = int(adapter_params(config) if callable(adapter_params) else adapter_params)
        trainable = [n_adapter]  # one block of values: the 8-bit optimizer threshold is not applied per tensor
        notes.append("adapter parameter count given explicitly; rank/targets only size the (T, r) activations")
    n_trainable, n_frozen = sum(trainable), sum(frozen)
    adapter_param_bytes = (n_trainable + n_frozen) * a
    adapter_grad_bytes = n_trainable * a
    optim_bytes = optimizer_state_bytes(trainable, optimizer, a)
    if optimizer != "adamw" and trainable:
        optim_bytes += 2 * 256 * 4  # the two shared 256-entry quantization maps
    if optimizer == "paged_adamw8bit":
        notes.append("paged optimizer state can be evicted to CPU under memory pressure; counted on the GPU here")

    # ---- activations (per token) ----------------------------------------------------------------------------
    act_kwargs = dict(fused=fused, compute_dtype=dtype_name, adapter_dtype=adapter_dtype_name, rank=rank,
                      lora_dropout=lora_dropout)
    first = chosen_layers[0] if chosen_layers else L
    per_layer = activation_bytes_per_token_per_layer(config, targets=targets, **act_kwargs)
    per_layer_first = activation_bytes_per_token_per_layer(
        config, targets=targets, input_requires_grad=False, **act_kwargs)
    per_layer_plain = activation_bytes_per_token_per_layer(config, targets=(), **act_kwargs)  # no adapter
    adapted = set(chosen_layers)
    layer_totals = []
    for i in range(L):
        if i < first:
            layer_totals.append(0)  # nothing before the first adapter needs a gradient
        elif i == first:
            layer_totals.append(sum(per_layer_first.values()))
        else:
            layer_totals.append(sum((per_layer if i in adapted else per_layer_plain).values()))
    heaviest_layer = max(layer_totals, default=0)
    layer_input = hidden * d  # what a checkpoint keeps per layer and token
    live_layers = L - first
    rope = 2 * head_dim(config) * d  # cos and sin, shared by all layers (per position; counted per token)
    cpu_offload_per_token = 0
    if grad_checkpointing == "none":
        inputs_per_token, act_per_token = 0, sum(layer_totals) + rope
    elif grad_checkpointing == "full":
        inputs_per_token, act_per_token = live_layers * layer_input, heaviest_layer + rope
    else:  # offload
        inputs_per_token, act_per_token = min(2, live_layers) * layer_input, heaviest_layer + rope
        cpu_offload_per_token = live_layers * layer_input
    # final norm (saves its input) — part of the head, but what autograd keeps for it is an activation
    act_per_token += (hidden * d + 4) if fused else (hidden * 4 + 4)

    # ---- logits / loss --------------------------------------------------------------------------------------
    if fused:
        # slimtune.ops.linear_cross_entropy: dx (T, hidden) kept for backward, fp32 row losses, int64 labels, and
        # one (chunk, V) logits buffer in the head's dtype, overwritten in place by the gradient.
        logits_per_token = hidden * d + 4 + 8
        if ce_chunk_tokens is None:
            # Liger's rule: chunk = T / ceil(V / hidden) rounded up to a power of two (< 2x): bounded by 2x,
            # plus the 64 MiB-of-fp32-logits floor of default_chunk_size (counted additively: conservative).
            from slimtune.ops.linear_ce import MIN_CHUNK_LOGITS_BYTES

            logits_fixed = 2 * MIN_CHUNK_LOGITS_BYTES * d // 4
            logits_per_token += math.ceil(2 * vocab * d / math.ceil(vocab / hidden))
        else:
            logits_fixed = ce_chunk_tokens * vocab * d
    else:
        logits_fixed = 0
        logits_per_token = vocab * (d + 4 + 4) + 8

    # ---- constants ------------------------------------------------------------------------------------------
    dequant = 0
    if quant != "none" and not fused:
        largest = max(o * i for o, i in shapes.values())
        if quantize_lm_head and lm_head_params:
            largest = max(largest, lm_head_params)
        dequant = largest * d
    elif quant != "none" and quantize_lm_head and lm_head_params:
        dequant = lm_head_params * d  # the chunked CE takes a dense head weight
        notes.append("quantize_lm_head on the fused path: the linear CE needs the head dequantized (counted)")
    context = int(cuda_context_gib * GiB)

    tokens = seq_len * micro_batch
    fixed = linear + embed + other + adapter_param_bytes + adapter_grad_bytes + optim_bytes + logits_fixed
    fixed += dequant + context
    bytes_per_token = inputs_per_token + act_per_token + logits_per_token
    est = Estimate(
        model=str(model_name),
        inputs=inputs,
        num_params=counts["total"],
        adapter_params=n_trainable,
        adapter_frozen_params=n_frozen,
        weights_linear_bytes=linear,
        weights_embed_bytes=embed,
        weights_other_bytes=other,
        adapter_param_bytes=adapter_param_bytes,
        adapter_grad_bytes=adapter_grad_bytes,
        optimizer_bytes=optim_bytes,
        layer_input_bytes=inputs_per_token * tokens,
        activation_bytes=act_per_token * tokens,
        logits_bytes=logits_fixed + logits_per_token * tokens,
        dequant_bytes=dequant,
        cuda_context_bytes=context,
        cpu_offload_bytes=cpu_offload_per_token * tokens,
        fixed_bytes=fixed,
        bytes_per_token=bytes_per_token,
        activation_per_token_per_layer=per_layer,
        notes=notes,
        config=config,
    )
    return est


def baseline_saved_bytes(config, *, tokens: int, compute_dtype: Any = "float32", adapter_dtype: Any = None,
                         rank: int = 16, targets: Any = None, lora_dropout: float = 0.0,
                         micro_batch: int = 1, device: str = "cuda") -> int:
    """Bytes autograd keeps for backward in HF + PEFT (no checkpointing), the whole model, for `tokens` tokens.

    This is the quantity `torch.autograd.graph.saved_tensors_hooks` measures (unique storages, parameters
    excluded): every layer's saved set (the first one without its input norm: the frozen embedding output needs
    no gradient), cos/sin once, the final norm, the fp32 log-softmax, the int64 labels and the scalar loss.
    """
    _, d = _dtype(compute_dtype)
    adapter_dtype = compute_dtype if adapter_dtype is None else adapter_dtype
    kw = dict(fused=False, compute_dtype=compute_dtype, adapter_dtype=adapter_dtype, rank=rank, targets=targets,
              lora_dropout=lora_dropout, device=device)
    first = sum(activation_bytes_per_token_per_layer(config, input_requires_grad=False, **kw).values())
    rest = sum(activation_bytes_per_token_per_layer(config, **kw).values())
    layers = first + (config.num_hidden_layers - 1) * rest
    seq = tokens // micro_batch
    rope = 2 * seq * head_dim(config) * d
    head = (config.hidden_size * 4 + 4) + config.vocab_size * 4 + 8
    return layers * tokens + rope + head * tokens + 4


# --------------------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------------------

_LABELS = {
    "weights_linear": "base linear weights",
    "weights_embed": "embeddings + lm_head",
    "weights_other": "norms + biases",
    "adapter_params": "adapter params",
    "adapter_grads": "adapter grads",
    "optimizer": "optimizer state",
    "layer_inputs": "checkpointed layer inputs",
    "activations": "saved activations",
    "logits": "logits / loss",
    "dequant": "dequant buffer",
    "cuda_context": "CUDA context",
}


def _details(est: Estimate) -> dict[str, str]:
    inp = est.inputs
    dt = inp["compute_dtype"]
    quant = inp["quant"]
    qdesc = dt if quant == "none" else f"{quant}{' + double quant' if inp['double_quant'] else ''}"
    ckpt = inp["grad_checkpointing"]
    act = {"none": "every layer", "full": "one layer, recomputed in backward", "offload": "one layer, recomputed"}[ckpt]
    inputs_detail = {
        "none": "no checkpointing",
        "full": "every layer's input (hidden x dtype)",
        "offload": "2 layer inputs on GPU, the rest in pinned host memory",
    }[ckpt]
    path = "fused" if inp["fused"] else "HF+PEFT"
    return {
        "weights_linear": f"{qdesc}",
        "weights_embed": f"{dt}" + (" (tied)" if getattr(est.config, "tie_word_embeddings", False) else ""),
        "weights_other": dt,
        "adapter_params": f"{est.adapter_params:,} trainable ({inp['kind']} r{inp['rank']}), {inp['adapter_dtype']}",
        "adapter_grads": inp["adapter_dtype"],
        "optimizer": inp["optimizer"],
        "layer_inputs": inputs_detail,
        "activations": f"{path}: {act} + final norm",
        "logits": ("chunked linear CE" if inp["fused"] else "full (T, V) logits + fp32 log-softmax"),
        "dequant": "none (fused tiles)" if inp["fused"] or quant == "none" else "largest weight, dequantized",
        "cuda_context": "constant",
    }


def to_json(est: Estimate) -> dict[str, Any]:
    """Every figure of the estimate as plain JSON-able values (bytes, plus GiB for reading)."""
    inp = dict(est.inputs)
    if callable(inp.get("adapter_params")):
        inp["adapter_params"] = est.adapter_params
    out: dict[str, Any] = {
        "model": est.model,
        "model_type": getattr(est.config, "model_type", None),
        "num_params": est.num_params,
        "inputs": inp,
        "tokens": est.tokens,
        "adapter_params": est.adapter_params,
        "adapter_frozen_params": est.adapter_frozen_params,
        "components_bytes": est.components(),
        "total_bytes": est.total_bytes,
        "total_gib": round(est.total_bytes / GiB, 4),
        "cpu_offload_bytes": est.cpu_offload_bytes,
        "fixed_bytes": est.fixed_bytes,
        "bytes_per_token": est.bytes_per_token,
        "activation_per_token_per_layer": dict(est.activation_per_token_per_layer),
        "notes": list(est.notes),
    }
    if est.inputs.get("gpu_mem_gib") is not None:
        out["gpu_mem_gib"] = est.inputs["gpu_mem_gib"]
        out["fits"] = est.fits()
        out["max_seq_len"] = est.max_seq_len_that_fits()
        out["advice"] = est.advice()
    return out


def format_table(est: Estimate):
    """A rich Table of the components, the total and (with a GPU size) the verdict."""
    from rich.table import Table

    inp = est.inputs
    title = (
        f"{est.model}: {inp['quant']} {inp['kind']} r{inp['rank']}, seq {inp['seq_len']} x batch "
        f"{inp['micro_batch']}, checkpointing {inp['grad_checkpointing']}, "
        f"{'fused' if inp['fused'] else 'HF+PEFT'}"
    )
    table = Table(title=title)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("detail")
    details = _details(est)
    for key, value in est.components().items():
        table.add_row(_LABELS[key], f"{value / GiB:.3f}", details[key])
    table.add_section()
    table.add_row("total (GPU)", f"{est.total_bytes / GiB:.3f}", f"{est.total_bytes / GB:.2f} GB", style="bold")
    if est.cpu_offload_bytes:
        table.add_row("pinned host memory", f"{est.cpu_offload_bytes / GiB:.3f}", "offloaded layer inputs")
    if inp.get("gpu_mem_gib") is not None:
        cap = inp["gpu_mem_gib"]
        verdict = "fits" if est.fits() else "does NOT fit"
        table.add_row(f"on {cap:g} GiB", verdict, f"longest seq_len that fits: {est.max_seq_len_that_fits():,}")
        for tip in est.advice():
            table.add_row("", "", f"• {tip}")
    return table


# --------------------------------------------------------------------------------------------------------------
# From a recipe
# --------------------------------------------------------------------------------------------------------------

#: Adapter kinds the estimator sizes under another kind's tensor layout (same shapes per module).
_KIND_AS = {"lamda_pp": "lamda"}


def _recipe_targets(targets: Any) -> tuple[str, ...]:
    """The projections a recipe's ``adapter.targets`` (suffixes, ``re:`` regexes or "all-linear") selects."""
    from slimtune.adapters.inject import _matches

    if targets in (None, "all-linear"):
        return PROJECTIONS
    chosen = tuple(
        p for p in PROJECTIONS
        if _matches(f"model.layers.0.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}", list(targets))
    )
    if not chosen:
        raise SlimtuneError(f"adapter.targets {targets!r}: matches none of {', '.join(PROJECTIONS)}")
    return chosen


def estimate_recipe_stages(recipe: Any, gpu_mem_gib: float | None = 24.0) -> list[tuple[str, Estimate]]:
    """One estimate per stage of ``recipe`` (a ``slimtune.config.recipe.Recipe``), without weights or a GPU.

    The model config comes from ``recipe.model.name`` via :func:`resolve_model_config` (built-in table, local
    folder / config.json / GGUF, or a cached hub config; ``pkg:`` paths resolve to the file a package ships). Every
    stage shares that architecture (a merged previous stage has the same shapes). Mapping: ``quant.mode``,
    ``double_quant``, ``compute_dtype`` ("auto" is bfloat16, what a CUDA run uses), ``quantize_lm_head``;
    ``adapter.kind``/``rank``/``targets``/``layers``/``dropout``; ``train.optimizer``/``micro_batch``/
    ``grad_checkpointing``/``fused``; seq_len = ``data.max_seq_len``.
    """
    from slimtune.errors import ModelError
    from slimtune.models.load import resolve_package_path

    try:
        config = resolve_model_config(resolve_package_path(recipe.model.name))
    except ModelError:
        raise
    except Exception as err:  # a GGUF/JSON reader failing on a malformed file: one line, not a traceback
        why = f"{type(err).__name__}: {err}"
        raise ModelError(f"model.name: {recipe.model.name}: cannot read its config ({why})") from None
    from slimtune.loram.estimate import estimate_loram, recipe_loram_layout

    loram = recipe_loram_layout(recipe)  # LoRAM: the training-time peak is the pruned model's
    out: list[tuple[str, Estimate]] = []
    for stage, r in recipe.resolved_stages():
        if getattr(stage, "kind", "train") != "train":  # merge / eval / arithmetic stages train nothing
            continue
        a, q, t = r.adapter, r.quant, r.train
        kind = _KIND_AS.get(a.kind, a.kind)
        layers = a.layers
        if layers is not None and hasattr(layers, "first"):
            layers = {"first": layers.first, "last": layers.last}
        extra: dict[str, Any] = {}
        notes: list[str] = []
        if kind not in ADAPTER_KINDS or a.modules_to_save:
            from slimtune.adapters.counts import trainable_counts

            options = {k: v for k, v in a.model_dump().items()
                       if k not in ("kind", "rank", "targets", "layers")}
            extra["adapter_params"] = trainable_counts(config, a.kind, a.rank, a.targets, a.layers, **options)
            if kind not in ADAPTER_KINDS:
                kind = "lora"
            if a.modules_to_save:
                notes.append(f"modules_to_save {', '.join(a.modules_to_save)} train in full "
                             "(counted in adapter params)")
        if a.kind != kind and a.kind in _KIND_AS:
            notes.append(f"{a.kind}: sized as {kind} at uniform rank {a.rank} (the per-module ranks depend on the "
                         "weights' spectrum; the total budget is the same)")
        est = (estimate if loram is None else functools.partial(estimate_loram, **loram))(
            config,
            quant=q.mode, double_quant=q.double_quant,
            compute_dtype="bfloat16" if q.compute_dtype == "auto" else q.compute_dtype,
            quantize_lm_head=q.quantize_lm_head,
            kind=kind, rank=a.rank, targets=_recipe_targets(a.targets), layers=layers, lora_dropout=a.dropout,
            optimizer=t.optimizer, seq_len=r.data.max_seq_len, micro_batch=t.micro_batch,
            grad_checkpointing=t.grad_checkpointing, fused=t.fused, gpu_mem_gib=gpu_mem_gib, **extra,
        )
        est.model = recipe.model.name + ("" if loram is None else f" pruned at ratio {loram['ratio']:g} (LoRAM)")
        est.notes.extend(notes)
        out.append((stage.name, est))
    if not out:
        raise SlimtuneError(f"{recipe.name or 'recipe'}: no training stage to estimate")
    return out


def estimate_for_recipe(recipe: Any, gpu_mem_gib: float | None = 24.0) -> Estimate:
    """The estimate of the recipe's most demanding stage (the max over stages; see :func:`estimate_recipe_stages`)."""
    stages = estimate_recipe_stages(recipe, gpu_mem_gib)
    return max(stages, key=lambda s: s[1].total_bytes)[1]
