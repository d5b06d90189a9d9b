"""What autograd keeps for backward, per token, per decoder layer: item by item, for any family (its ArchSpec).

Unfused = HF transformers decoder layer + PEFT-style LoRA Linear (what ``transformers`` and ``peft`` save, read
from the Llama/Gemma/Phi-3 modeling files, RMSNorm, apply_rotary_pos_emb, sdpa/eager attention and peft's
lora.Linear.forward / bnb Linear4bit.forward):

- RMSNorm (every norm the spec lists, Llama or Gemma cast): ``x.to(float32)`` is saved by pow and mul (the input
  itself when the compute dtype is fp32) and rsqrt(var + eps) per row (fp32); the frozen weight (or 1 + w) only.
  q/k norms (Qwen3, Gemma 3) do the same per head.
- A frozen base linear keeps no activation; PEFT's lora_A keeps its input: the shared normed input when adapter and
  compute dtype agree and there is no dropout; otherwise the ``x.to(adapter_dtype)`` copy (one per adapted module)
  or the dropout output plus its mask. lora_B keeps the (T, r) product A x.
- RoPE keeps only cos/sin (shared by all layers: counted once per model).
- SDPA keeps q, k, v, out (native GQA: k and v at KV-head size) and the fp32 logsumexp per head. With a packed
  qkv (Phi-3) the o_proj input is a second copy of the attention output.
- Eager attention (Gemma 2's softcap has no SDPA kernel) keeps q, the repeated k and v (Hq heads each), the tanh of
  the capped scores (T per head and token), the fp32 softmax (and its cast copy below fp32): the quadratic items.
- Gated MLP (SwiGLU / GeGLU, separate or packed gate|up): the activation keeps e = gate(x); the product keeps
  act(e) and g = up(x); down's lora_A keeps the product (or its cast copy).

Fused = slimtune's Functions (DESIGN §3): a "pre" RMSNorm (frozen weight) keeps its output, which is the very tensor
the qkv / MLP Function keeps as its X, plus its fp32 inverse RMS; a "post" norm (Gemma) keeps its input; q/k norms
keep their input and inverse RMS; the qkv Function (or the packed qkv projection) keeps X once; RoPE keeps nothing
per layer; attention keeps what the HF attention function keeps (above); o keeps its input (the attention output);
the LoRA MLP Function keeps X, e = gate(X), g = up(X); every adapted module also keeps its (T, r) product X Aᵀ.
(Checked against saved_tensors_hooks in tests/bench/test_estimate_vs_measured.py and test_estimate_families.py.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from slimtune.bench.sizes import dtype_bytes
from slimtune.errors import SlimtuneError
from slimtune.models.arch import ROLES, ArchSpec, Geometry, known_model_types, spec_for

F32 = 4


def family(config: Any) -> ArchSpec:
    spec = spec_for(config)
    if spec is None:
        raise SlimtuneError(f"model_type {getattr(config, 'model_type', None)!r}: no family describes it "
                            f"(known: {', '.join(known_model_types())})")
    return spec


def normalize_targets(targets: str | Collection[str] | None, spec: ArchSpec | None = None) -> tuple[str, ...]:
    """Target module names of ``spec`` ("all-linear" = all of them; a role such as "q" or "gate" names the module
    that computes it — Phi-3's qkv_proj / gate_up_proj). Default spec: Llama's."""
    spec = spec or family("llama")
    if targets is None or targets in ("all", "all-linear", "all_linear"):
        return spec.proj_names
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen: set[str] = set()
    for t in targets:
        if t in spec.proj_names:
            chosen.add(t)
        elif t in ROLES:
            chosen.add(spec.role_proj(t).name)
        else:
            raise SlimtuneError(f"adapter target {t!r}: expected some of {', '.join(spec.proj_names)} "
                                f"(or the roles {', '.join(ROLES)})")
    return tuple(p for p in spec.proj_names if p in chosen)


def layer_items(
    spec: ArchSpec,
    geo: Geometry,
    ranks: Mapping[str, int],
    *,
    fused: bool,
    compute_bytes: int,
    adapter_bytes: int,
    lora_dropout: float = 0.0,
    input_requires_grad: bool = True,
    device: str = "cuda",
    eager: bool = False,
    softcap: bool = False,
    masked: bool = False,
) -> tuple[dict[str, int], dict[str, int]]:
    """(items linear in tokens, items linear in tokens x seq_len) of one layer, bytes per token.

    ``ranks``: adapted module name -> rank (the layer's adapters). ``eager``: HF's eager attention (with
    ``softcap``: the tanh-capped scores are kept too). ``masked``: SDPA gets an explicit mask (a sliding layer
    longer than its window): HF then repeats k/v to all query heads, and SDPA keeps a float copy of the bool mask.
    """
    d, a = compute_bytes, adapter_bytes
    hidden, inter, D = geo.hidden, geo.intermediate, geo.head_dim
    q_out, kv_out = geo.heads * D, geo.kv_heads * D
    items: dict[str, int] = {}
    quad: dict[str, int] = {}
    lora_r = sum(ranks.values())

    # attention core: identical on both paths (the fused path keeps HF's attention function)
    if eager:
        kv_saved = 2 * (q_out if geo.group > 1 else kv_out)  # repeat_kv materialises Hq heads when G > 1
        items["attention q, k/v (repeated), out"] = (2 * q_out + kv_saved) * d
        quad["attention softmax (fp32)"] = geo.heads * F32 + (geo.heads * d if d != F32 else 0)
        if softcap:
            quad["attention tanh(capped scores)"] = geo.heads * d
    else:
        kv_saved = q_out if masked and geo.group > 1 else kv_out  # repeat_kv without SDPA's native GQA
        items["attention q,k,v,out"] = (2 * q_out + 2 * kv_saved) * d
        items["attention logsumexp"] = geo.heads * F32
        if masked:
            quad["attention mask (float copy)"] = d
    n_pre = sum(1 for _, where in spec.layer_norms if where == "pre")
    n_post = len(spec.layer_norms) - n_pre

    if fused:
        # (a packed qkv is split into contiguous q, k, v copies: the same items as separate projections)
        items["input_norm (inv_rms)"] = F32 if input_requires_grad else 0
        items["other pre norms (inv_rms)"] = (n_pre - 1) * F32
        if n_post:
            items["post norms (input, inv_rms)"] = n_post * (hidden * d + F32)
        items["qkv input (= input_norm output)"] = hidden * d
        if spec.qk_norm:
            items["q/k norms (input, inv_rms)"] = (q_out + kv_out) * d + (geo.heads + geo.kv_heads) * F32
        items["mlp input (= pre-MLP norm output)"] = hidden * d
        items["mlp e=gate(x), g=up(x)"] = 2 * inter * d
        items["lora x·Aᵀ (T, r)"] = lora_r * d
        return items, quad

    mask = 1 if str(device).startswith("cuda") else a  # what dropout keeps per value
    direct = a == d and lora_dropout == 0.0  # lora_A keeps the very tensor the base layer received
    attn_in = tuple(p.name for p in spec.projections if p.block == "attn" and "o" not in p.parts)
    mlp_in = tuple(p.name for p in spec.projections if p.block == "mlp" and "down" not in p.parts)
    in_of = {p.name: geo.role_in(p.parts[0]) for p in spec.projections}

    def lora_inputs(projs: tuple[str, ...], input_needs_grad: bool = True) -> int:
        """Input copies the adapted ``projs`` add beyond a shared input (which the caller counts)."""
        total = 0
        for p in projs:
            if p not in ranks:
                continue
            if lora_dropout > 0.0:  # dropout output, and its mask / noise when a gradient flows back through it
                total += in_of[p] * a + (in_of[p] * mask if input_needs_grad else 0)
            elif a != d:
                total += in_of[p] * a  # x.to(adapter_dtype)
        return total

    norm = hidden * F32 + F32
    items["input_norm (x fp32, rsqrt)"] = norm if input_requires_grad else 0
    items["other norms (x fp32, rsqrt)"] = (len(spec.layer_norms) - 1) * norm
    items["qkv input (shared)"] = hidden * d if direct and any(p in ranks for p in attn_in) else 0
    items["qkv lora input copies"] = lora_inputs(attn_in, input_requires_grad)
    if spec.qk_norm:
        items["q/k norms (x fp32, rsqrt)"] = (q_out + kv_out) * F32 + (geo.heads + geo.kv_heads) * F32
    if spec.role_proj("v").packed:
        # q/k/v are strided slices of the packed output: SDPA writes its output head-major, so the (T, Hq·D)
        # o_proj input is a second copy (measured: tests/bench/test_estimate_families.py, Phi-3, CPU SDPA)
        items["attention output copy (packed qkv)"] = q_out * d
    items["o lora input copy"] = lora_inputs(tuple(p.name for p in spec.projections if "o" in p.parts))
    items["mlp input (shared)"] = hidden * d if direct and any(p in ranks for p in mlp_in) else 0
    items["gate/up lora input copies"] = lora_inputs(mlp_in)
    items["mlp e, act(e), g"] = 3 * inter * d
    items["down input"] = inter * d if direct and "down_proj" in ranks else 0
    items["down lora input copy"] = lora_inputs(("down_proj",))
    items["lora A·x (T, r)"] = lora_r * a
    return items, quad


def masked_layer(spec: ArchSpec, config: Any, i: int, seq_len: int | None) -> bool:
    """Whether layer i's attention gets an explicit mask at ``seq_len``: a sliding layer longer than its window."""
    window = spec.sliding_window(config)
    return bool(seq_len and window and seq_len > window and spec.sliding_layer(config, i))


def attention_mode(spec: ArchSpec, config: Any) -> tuple[bool, bool]:
    """(eager, softcap): whether HF runs eager attention for this config (softcapped attention has no SDPA kernel)
    and whether the scores are capped."""
    softcap = spec.attn_softcap(config) is not None
    impl = getattr(config, "_attn_implementation", None)
    eager = impl == "eager" or (impl in (None, "eager") and spec.needs_eager_attention(config))
    return eager, softcap


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
    seq_len: int | None = None,
    layer: int = 0,
) -> dict[str, int]:
    """What decoder layer ``layer`` of ``config`` keeps for backward per token, item by item (bytes; sum for the
    total), with an adapter of ``rank`` on each of ``targets`` (see the module docstring). Items that grow with the
    sequence (eager attention, a sliding layer's mask) are included at ``seq_len`` when given."""
    spec = family(config)
    _, d = dtype_bytes(compute_dtype)
    _, a = dtype_bytes(adapter_dtype)
    ranks = dict.fromkeys(normalize_targets(targets, spec), rank)
    eager, softcap = attention_mode(spec, config)
    items, quad = layer_items(spec, spec.geometry(config), ranks, fused=fused, compute_bytes=d, adapter_bytes=a,
                              lora_dropout=lora_dropout, input_requires_grad=input_requires_grad, device=device,
                              eager=eager, softcap=softcap, masked=masked_layer(spec, config, layer, seq_len))
    if seq_len is not None:
        items.update({k: v * seq_len for k, v in quad.items()})
    return items


def baseline_saved_bytes(config, *, tokens: int, compute_dtype: Any = "float32", adapter_dtype: Any = None,
                         rank: int = 16, targets: Any = None, lora_dropout: float = 0.0,
                         micro_batch: int = 1, device: str = "cuda") -> int:
    """Bytes autograd keeps for backward in HF + PEFT (no checkpointing), the whole model, for ``tokens`` tokens.

    This is the quantity ``torch.autograd.graph.saved_tensors_hooks`` measures (unique storages, parameters
    excluded): every layer's saved set (the first one without its input norm: the frozen embedding output needs
    no gradient), cos/sin once, the final norm, the fp32 log-softmax, the int64 labels and the scalar loss.
    """
    spec = family(config)
    geo = spec.geometry(config)
    _, d = dtype_bytes(compute_dtype)
    adapter_dtype = compute_dtype if adapter_dtype is None else adapter_dtype
    seq = tokens // micro_batch
    kw = dict(fused=False, compute_dtype=compute_dtype, adapter_dtype=adapter_dtype, rank=rank, targets=targets,
              lora_dropout=lora_dropout, device=device, seq_len=seq)
    layers = sum(sum(activation_bytes_per_token_per_layer(config, input_requires_grad=i > 0, layer=i, **kw).values())
                 for i in range(geo.layers))
    rope = 2 * seq * geo.head_dim * d * spec.rope_sets(config)
    head = (geo.hidden * 4 + 4) + geo.vocab * 4 + 8
    if spec.final_softcap(config) is not None:
        head += geo.vocab * d  # the tanh output of the final-logit softcap
    return layers * tokens + rope + head * tokens + 4
