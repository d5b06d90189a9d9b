"""Swap a Llama/Qwen2 causal LM's modules for fused ones: one function, no per-model patch files.

    report = fuse_model(model, log=print)      # in place; returns what took the fused path and what did not, and why
    loss = causal_lm_loss(model, input_ids=ids, labels=labels)   # chunked linear CE: the (T, V) logits never exist

What is swapped, per decoder layer (the children keep their names, so state dicts and adapter exports are unchanged):

* ``input_layernorm`` / ``post_attention_layernorm`` (and the final ``model.norm``) -> :class:`FusedRMSNorm`
  (``slimtune.ops.rms_norm``: saves the inverse RMS per row, and its output — shared with the next op — or input).
* ``self_attn`` -> :class:`FusedAttention`: q/k/v through one ``lora_qkv`` call (saves X once), RoPE through
  ``slimtune.ops.rope`` (in place on the projection outputs when autograd allows it), the model's own attention
  function (SDPA / eager / flash: unchanged), ``o_proj`` through ``lora_linear``.
* ``mlp`` -> :class:`FusedMLP`: gate/up/down SwiGLU as one ``lora_mlp`` call.

A projection takes a fused op when it is a frozen ``nn.Linear`` / bitsandbytes ``Linear4bit`` (no LoRA term), or a
slimtune adapter over one (read through ``.factors()``) with dropout 0. Anything else — adapter dropout > 0, an
unknown adapter class (e.g. PEFT's own layers), a trainable base weight, a bias the fused op cannot take, an
activation other than SiLU, an unknown architecture — keeps the module's own forward, and the report says so:
nothing falls back silently. The loss is fused only through :func:`causal_lm_loss` (the HF ``forward(labels=...)``
still materialises the logits; use it for generation and evaluation).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimtune.ops.linear_ce import linear_cross_entropy
from slimtune.ops.rms_norm import rms_norm
from slimtune.ops.rope import rope

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# --------------------------------------------------------------------------------------------- report


@dataclass
class FuseReport:
    """Which modules took the fused path (``fused``) and which did not, with the reason (``unfused``)."""

    architecture: str
    fused: list[str] = field(default_factory=list)  # "model.layers.0.mlp: lora_mlp"
    unfused: list[tuple[str, str]] = field(default_factory=list)  # ("model.layers.0.mlp", "why")

    @property
    def fully_fused(self) -> bool:
        return not self.unfused

    def lines(self) -> list[str]:
        """A short summary: counts per kind of module, then every module that did not fuse and why."""
        kinds: dict[str, int] = {}
        for entry in self.fused:
            name, _, op = entry.partition(": ")
            kind = _kind(name) + f" ({op})"
            kinds[kind] = kinds.get(kind, 0) + 1
        out = [f"fused kernels on {self.architecture}: " + (", ".join(f"{k} x{n}" for k, n in kinds.items()) or "none")]
        reasons: dict[tuple[str, str], list[str]] = {}
        for name, why in self.unfused:
            reasons.setdefault((_kind(name), why), []).append(name)
        for (kind, why), names in reasons.items():
            where = names[0] if len(names) == 1 else f"{len(names)} modules ({names[0]}, ...)"
            out.append(f"not fused: {kind} in {where}: {why}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _kind(name: str) -> str:
    """'model.layers.3.self_attn.qkv' -> 'self_attn.qkv' (the name without the layer prefix)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 2 :]) or name
    return name


# --------------------------------------------------------------------------------------------- projections


def _is_linear4bit(m: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, bnb.nn.Linear4bit)


def _is_adapter(m: nn.Module) -> bool:
    from slimtune.adapters.base import Adapter

    return isinstance(m, Adapter)


def _base_and_adapter(m: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    return (m.base_layer, m) if _is_adapter(m) else (m, None)


def projection_support(m: nn.Module) -> str | None:
    """None when ``m`` can run through the fused linear ops, else the reason it cannot."""
    base, adapter = _base_and_adapter(m)
    if adapter is None and _is_adapter_like(m):
        return f"unsupported adapter {type(m).__name__}"
    if not (type(base) is nn.Linear or _is_linear4bit(base)):
        what = f"adapter {type(m).__name__} over " if adapter is not None else ""
        return f"{what}{type(base).__name__} is not an nn.Linear or bitsandbytes Linear4bit"
    if base.weight.requires_grad:
        return "base weight is trainable (only frozen bases fuse)"
    if base.bias is not None and base.bias.requires_grad:
        return "base bias is trainable"
    if adapter is not None:
        dropout = float(getattr(adapter.config, "dropout", 0.0))
        if dropout > 0:
            return f"adapter dropout {dropout:g} > 0"
    return None


def _is_adapter_like(m: nn.Module) -> bool:
    """A foreign adapter (PEFT's LoraLayer and the like) hiding in a plain-looking module."""
    return any(n.startswith(("lora_", "base_layer")) for n, _ in m.named_children())


_BASE_NORM_SQ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base layer -> (weight key, ‖W_o‖²)


def _base_norm_sq(base: nn.Module) -> torch.Tensor:
    """‖W_o‖² per output row of a frozen base (DoRA), computed once per base weight (recomputed if replaced)."""
    w = base.weight
    key = (id(w), w._version)
    hit = _BASE_NORM_SQ.get(base)
    if hit is None or hit[0] != key:
        from slimtune.ops.lora_linear import base_row_norm_sq
        from slimtune.ops.nf4 import as_nf4_weight

        hit = (key, base_row_norm_sq(as_nf4_weight(w)))
        _BASE_NORM_SQ[base] = hit
    return hit[1]


def projection(m: nn.Module):
    """The ``LoRAProjection`` (slimtune.ops.lora_linear) of projection ``m``, read live at every call."""
    from slimtune.ops.lora_linear import LoRAProjection

    base, adapter = _base_and_adapter(m)
    if adapter is None:
        return LoRAProjection(base=base, bias=base.bias)
    f = adapter.factors()
    norm_sq = _base_norm_sq(base) if f.magnitude is not None else None
    return LoRAProjection(
        base=base, bias=base.bias, lora_A=f.A, lora_B=f.B, scale=float(f.scale), lora_M=f.mid,
        magnitude=f.magnitude, base_norm_sq=norm_sq,
    )


def _fused_op(name: str, module: str | None = None) -> Callable | None:
    """A fused linear op (``lora_projection``, ``lora_qkv``, ``lora_mlp``) if its ops module is importable."""
    import importlib

    try:
        mod = importlib.import_module(f"slimtune.ops.{module or name}")
    except ImportError:
        return None
    return getattr(mod, name, None)


# --------------------------------------------------------------------------------------------- modules


class FusedRMSNorm(nn.Module):
    """RMSNorm through ``slimtune.ops.rms_norm``; holds the original ``weight`` parameter (shared, not copied).

    A frozen weight without zeros saves the output y for backward instead of the input (``save="output"``): the
    fused projection that follows saves y anyway, so the norm costs only its rstd. The zero check runs once per
    weight version (never again for a frozen weight). A trainable weight saves the input.
    """

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        self._checked: tuple[int, int, bool] | None = None  # (data_ptr, version, no zeros)

    def _save_mode(self) -> str:
        w = self.weight
        if w.requires_grad:
            return "input"
        key = (w.data_ptr(), w._version)
        if self._checked is None or self._checked[:2] != key:
            self._checked = (*key, bool((w != 0).all()))
        return "output" if self._checked[2] else "input"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, eps=self.variance_epsilon, save=self._save_mode())

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedAttention(nn.Module):
    """Llama/Qwen2 attention with fused q/k/v, RoPE and o: same children, same call signature as HF's."""

    _COPY = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout", "is_causal",
             "sliding_window", "layer_type")

    def __init__(self, attn: nn.Module, *, qkv_fused: bool, o_fused: bool):
        super().__init__()
        for a in self._COPY:
            if hasattr(attn, a):
                setattr(self, a, getattr(attn, a))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qkv_fused, self.o_fused = qkv_fused, o_fused
        self._eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        self.training = attn.training

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_fused:
            q, k, v = (projection(p) for p in (self.q_proj, self.k_proj, self.v_proj))
            return _fused_op("lora_qkv")(x, q=q, k=k, v=v)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        B, T, _ = hidden_states.shape  # (B, T, hidden)
        D = self.head_dim
        q, k, v = self._qkv(hidden_states)  # (B, T, Hq*D), (B, T, Hk*D), (B, T, Hk*D)
        cos, sin = position_embeddings  # (B, T, D)
        q, k = rope(q, k, cos=cos, sin=sin, head_dim=D, inplace=True)
        q = q.view(B, T, -1, D).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, -1, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, -1, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **extra, **kwargs,
        )
        out = out.reshape(B, T, -1).contiguous()  # (B, T, Hq*D)
        if self.o_fused:
            out = _fused_op("lora_projection", "lora_linear")(out, projection(self.o_proj))
        else:
            out = self.o_proj(out)
        return out, weights


class FusedMLP(nn.Module):
    """SwiGLU MLP as one ``lora_mlp`` call; same children (gate_proj, up_proj, down_proj) as HF's."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = (projection(p) for p in (self.gate_proj, self.up_proj, self.down_proj))
        return _fused_op("lora_mlp")(x, gate=g, up=u, down=d)


# --------------------------------------------------------------------------------------------- fuse_model


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and hasattr(m, "variance_epsilon")


def fuse_model(model: nn.Module, *, log: Callable[[str], Any] | None = None) -> FuseReport:
    """Swap the supported modules of a Llama/Qwen2-family causal LM for fused ones, in place.

    Call it after the adapters are injected (it reads them through ``.factors()`` at every forward, so training
    the factors needs no re-fuse). Idempotent. ``log`` receives the report's summary lines.
    """
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None) or type(model).__name__
    report = FuseReport(architecture=str(arch))
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if arch not in SUPPORTED_MODEL_TYPES or layers is None:
        report.unfused.append(("model", f"unknown architecture {arch!r} (fused: {', '.join(SUPPORTED_MODEL_TYPES)})"))
        _emit(report, log)
        return report
    prefix = "model"
    lora_linear = _fused_op("lora_projection", "lora_linear")
    lora_qkv, lora_mlp = _fused_op("lora_qkv"), _fused_op("lora_mlp")
    act = str(getattr(config, "hidden_act", "silu"))

    for i, layer in enumerate(layers):
        base = f"{prefix}.layers.{i}"
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            _fuse_norm(layer, norm_name, f"{base}.{norm_name}", report)
        _fuse_attention(layer, f"{base}.self_attn", report, lora_linear, lora_qkv)
        _fuse_mlp(layer, f"{base}.mlp", report, lora_mlp, act)
    _fuse_norm(decoder, "norm", f"{prefix}.norm", report)
    head = getattr(model, "lm_head", None)
    why = lm_head_support(head)
    if why is None:
        report.fused.append("lm_head+loss: linear_cross_entropy via causal_lm_loss")
    else:
        report.unfused.append(("lm_head+loss", why))
    _emit(report, log)
    return report


def _emit(report: FuseReport, log: Callable[[str], Any] | None) -> None:
    if log is not None:
        for line in report.lines():
            log(line)


def _fuse_norm(parent: nn.Module, name: str, full: str, report: FuseReport) -> None:
    m = getattr(parent, name, None)
    if isinstance(m, FusedRMSNorm):
        report.fused.append(f"{full}: rms_norm")
    elif m is not None and _is_rms_norm(m):
        setattr(parent, name, FusedRMSNorm(m.weight, m.variance_epsilon))
        report.fused.append(f"{full}: rms_norm")
    else:
        report.unfused.append((full, f"{type(m).__name__} is not an RMSNorm"))


def _fuse_attention(layer: nn.Module, full: str, report: FuseReport, lora_linear, lora_qkv) -> None:
    attn = layer.self_attn
    if isinstance(attn, FusedAttention):  # already fused: report again, unchanged
        qkv_ok, o_ok = attn.qkv_fused, attn.o_fused
    else:
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            report.unfused.append((full, f"{type(attn).__name__} has no q/k/v/o projections"))
            return
        qkv_why = _qkv_support(attn, lora_qkv)
        o_why = "slimtune.ops.lora_linear is not available" if lora_linear is None else projection_support(attn.o_proj)
        qkv_ok, o_ok = qkv_why is None, o_why is None
        if not qkv_ok:
            report.unfused.append((f"{full}.qkv", qkv_why))
        if not o_ok:
            report.unfused.append((f"{full}.o_proj", o_why))
        layer.self_attn = FusedAttention(attn, qkv_fused=qkv_ok, o_fused=o_ok)
    report.fused.append(f"{full}.rope: rope")
    if qkv_ok:
        report.fused.append(f"{full}.qkv: lora_qkv")
    if o_ok:
        report.fused.append(f"{full}.o_proj: lora_linear")


def _qkv_support(attn: nn.Module, lora_qkv) -> str | None:
    if lora_qkv is None:
        return "slimtune.ops.lora_qkv is not available"
    for n in ("q_proj", "k_proj", "v_proj"):
        why = projection_support(getattr(attn, n))
        if why is not None:
            return f"{n}: {why}"
    return None


def _fuse_mlp(layer: nn.Module, full: str, report: FuseReport, lora_mlp, act: str) -> None:
    mlp = layer.mlp
    if isinstance(mlp, FusedMLP):
        report.fused.append(f"{full}: lora_mlp")
        return
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        report.unfused.append((full, f"{type(mlp).__name__} is not a gate/up/down MLP"))
        return
    if act != "silu":
        report.unfused.append((full, f"activation {act!r} (the fused MLP is SwiGLU: silu)"))
        return
    if lora_mlp is None:
        report.unfused.append((full, "slimtune.ops.lora_mlp is not available"))
        return
    for n in ("gate_proj", "up_proj", "down_proj"):
        why = projection_support(getattr(mlp, n))
        if why is not None:
            report.unfused.append((full, f"{n}: {why}"))
            return
    layer.mlp = FusedMLP(mlp)
    report.fused.append(f"{full}: lora_mlp")


# --------------------------------------------------------------------------------------------- loss


def lm_head_support(head: nn.Module | None) -> str | None:
    """None when ``head`` can feed the chunked linear cross-entropy, else why not."""
    if head is None:
        return "the model has no lm_head"
    if _is_adapter(head) or _is_adapter_like(head):
        return f"lm_head is an adapter ({type(head).__name__})"
    if type(head) is nn.Linear or _is_linear4bit(head):
        return None
    return f"lm_head is a {type(head).__name__}"


def _head_weight(head: nn.Module) -> torch.Tensor:
    """The (V, H) weight; a 4-bit head is dequantized for this call only (a transient V x H copy, freed after)."""
    if _is_linear4bit(head):
        from slimtune.adapters.base import dense_weight

        dtype = getattr(head, "compute_dtype", None) or torch.float32
        return dense_weight(head, dtype)
    return head.weight


def causal_lm_loss(
    model: nn.Module,
    *,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM without materialising its logits.

    Same target convention as HF's ``ForCausalLMLoss``: the prediction at position t is scored against
    ``labels[t + 1]`` (labels are shifted here; ``ignore_index`` marks tokens without a target). ``reduction="mean"``
    averages over the targets of this batch; ``reduction="sum"`` (optionally ``/ normalizer``) lets a training loop
    normalise by the target count of the whole accumulated batch. Works on fused and unfused models alike.
    """
    head = getattr(model, "lm_head", None)
    why = lm_head_support(head)
    if why is not None:
        raise ValueError(f"causal_lm_loss: {why}")
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, H)
    targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T)
    return linear_cross_entropy(
        hidden, _head_weight(head), targets.to(hidden.device), bias=head.bias, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, chunk_size=chunk_size, backend=backend,
    )
