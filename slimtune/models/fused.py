"""Swap a causal LM's decoder modules for fused ones, driven by its family's ``ArchSpec``: no per-model patch files.

    report = fuse_model(model, log=print)      # in place; returns what took the fused path and what did not, and why
    loss = causal_lm_loss(model, input_ids=ids, labels=labels)   # chunked linear CE: the (T, V) logits never exist

What is swapped, per decoder layer (the children keep their names, so state dicts and adapter exports are unchanged;
HF's own decoder-layer forward still runs, so residuals, Gemma's post-norms and Phi-3's residual dropout are HF's):

* every RMSNorm the spec lists (``input_layernorm``, ``post_attention_layernorm``; Gemma's four), the attention's
  q/k norms (Qwen3, Gemma 3) and the final norm -> :class:`FusedRMSNorm` (``slimtune.ops.rms_norm``, with the
  spec's weight offset: Gemma's ``1 + w``). A norm that feeds a fused projection saves its output (shared with that
  op) instead of its input.
* attention -> :class:`FusedAttention`: q/k/v through one ``lora_qkv`` call (saves X once) — or, for a packed
  ``qkv_proj`` (Phi-3), one ``lora_linear`` call split into q | k | v — q/k norms, RoPE through ``slimtune.ops.rope``
  (in place on the projection outputs when autograd allows it), the model's own attention function (SDPA / eager /
  flash: unchanged, with the module's scaling, sliding window and logit softcap), ``o_proj`` through ``lora_linear``.
* MLP -> :class:`FusedMLP`: gate/up/down as one ``lora_mlp`` call with the spec's activation (SwiGLU or GeGLU); a
  packed ``gate_up_proj`` goes in as one projection that the op splits.

A projection takes a fused op when it is a frozen ``nn.Linear`` / bitsandbytes ``Linear4bit`` (no LoRA term), or a
slimtune adapter over one (read through ``.factors()``) with dropout 0. Anything else — adapter dropout > 0, an
unknown adapter class (e.g. PEFT's own layers), a trainable base weight, a trainable bias, an op that lacks an
argument the family needs, a family without a spec or whose spec says it cannot fuse — keeps the module's own
forward, and the report says so: nothing falls back silently. The loss is fused only through
:func:`causal_lm_loss` (the HF ``forward(labels=...)`` still materialises the logits; use it for generation and
evaluation); it applies the family's final-logit softcap.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import Adapter
from slimtune.models.arch import ArchSpec, known_model_types, spec_for
from slimtune.ops.lora_linear import LoRAProjection, base_row_norm_sq, lora_projection
from slimtune.ops.lora_mlp import lora_mlp
from slimtune.ops.lora_qkv import lora_qkv
from slimtune.ops.nf4 import as_nf4_weight
from slimtune.ops.linear_ce import linear_cross_entropy
from slimtune.ops.rms_norm import rms_norm
from slimtune.ops.rope import rope

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
    return isinstance(m, Adapter)


def _base_and_adapter(m: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    return (m.base_layer, m) if _is_adapter(m) else (m, None)


def projection_support(m: nn.Module) -> str | None:
    """None when ``m`` can run through the fused linear ops, else the reason it cannot."""
    base, adapter = _base_and_adapter(m)
    if adapter is None and _is_adapter_like(m):
        return f"unsupported adapter {type(m).__name__}"
    if adapter is not None and _is_adapter(base):  # start_from: stacked (the fused ops take one low-rank term)
        return f"stacked adapter ({type(m).__name__} over a frozen {type(base).__name__})"
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
        hit = (key, base_row_norm_sq(as_nf4_weight(w)))
        _BASE_NORM_SQ[base] = hit
    return hit[1]


def projection(m: nn.Module):
    """The ``LoRAProjection`` (slimtune.ops.lora_linear) of projection ``m``, read live at every call."""
    base, adapter = _base_and_adapter(m)
    if adapter is None:
        return LoRAProjection(base=base, bias=base.bias)
    f = adapter.factors()
    norm_sq = _base_norm_sq(base) if f.magnitude is not None else None
    return LoRAProjection(
        base=base, bias=base.bias, lora_A=f.A, lora_B=f.B, scale=float(f.scale), lora_M=f.mid,
        magnitude=f.magnitude, base_norm_sq=norm_sq,
    )


_FUSED_OPS: dict[str, Callable] = {"lora_projection": lora_projection, "lora_qkv": lora_qkv, "lora_mlp": lora_mlp}


def _fused_op(name: str, module: str | None = None) -> Callable | None:
    """A fused linear op: ``lora_projection`` (ops/lora_linear.py), ``lora_qkv``, ``lora_mlp``."""
    return _FUSED_OPS.get(name)


# --------------------------------------------------------------------------------------------- op capabilities


def _accepts(fn: Callable | None, arg: str) -> bool:
    """Whether op ``fn`` takes keyword ``arg`` (the family arguments: offset, activation, gate_up, softcap)."""
    if fn is None:
        return False
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _norm_eps(m: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(m, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


# --------------------------------------------------------------------------------------------- modules


class FusedRMSNorm(nn.Module):
    """RMSNorm through ``slimtune.ops.rms_norm``; holds the original ``weight`` parameter (shared, not copied).

    ``offset`` is the spec's weight offset (Gemma: the norm multiplies by 1 + w). With ``save_output`` and a
    frozen weight whose offset + w has no zeros, the op saves the output y instead of the input: the fused
    projection that follows saves y anyway, so the norm costs only its rstd. The zero check runs once per weight
    version (never again for a frozen weight). A trainable weight saves the input.
    """

    def __init__(self, weight: nn.Parameter, eps: float, *, offset: float = 0.0, save_output: bool = True):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        self.offset = float(offset)
        self.save_output = save_output
        self._checked: tuple[int, int, bool] | None = None  # (data_ptr, version, no zeros)

    def _save_mode(self) -> str:
        w = self.weight
        if w.requires_grad or not self.save_output:
            return "input"
        key = (w.data_ptr(), w._version)
        if self._checked is None or self._checked[:2] != key:
            self._checked = (*key, bool(((w + self.offset) != 0).all()))
        return "output" if self._checked[2] else "input"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        extra = {"offset": self.offset} if self.offset else {}
        return rms_norm(hidden_states, self.weight, eps=self.variance_epsilon, save=self._save_mode(), **extra)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset:g}"


class FusedAttention(nn.Module):
    """Attention with fused q/k/v (separate or packed), q/k norms, RoPE and o: same children, same call signature
    as HF's. Scaling, sliding window and the attention-logit softcap are the HF module's own values."""

    _COPY = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout", "is_causal",
             "layer_type", "is_sliding")

    def __init__(self, attn: nn.Module, spec: ArchSpec, *, qkv_fused: bool, o_fused: bool,
                 sliding_window: int | None, softcap: float | None):
        super().__init__()
        for a in self._COPY:
            if hasattr(attn, a):
                setattr(self, a, getattr(attn, a))
        self.packed = spec.role_proj("q").packed
        self.qkv_names = (spec.role_proj("q").name,) if self.packed else tuple(
            spec.role_proj(r).name for r in ("q", "k", "v"))
        for n in self.qkv_names + ("o_proj",):
            setattr(self, n, getattr(attn, n))
        if spec.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qk_norm = spec.qk_norm
        geo = spec.geometry(attn.config)
        self.split = spec.split_sizes(self.qkv_names[0], geo) if self.packed else None
        self.qkv_fused, self.o_fused = qkv_fused, o_fused
        self.sliding_window, self.softcap = sliding_window, softcap
        self._eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        self.training = attn.training

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed:
            p = getattr(self, self.qkv_names[0])
            qkv = _fused_op("lora_projection", "lora_linear")(x, projection(p)) if self.qkv_fused else p(x)
            # contiguous copies: the (T, (Hq + 2 Hk) D) buffer dies here and RoPE may rotate q, k in place
            return tuple(t.contiguous() for t in qkv.split(self.split, dim=-1))
        if self.qkv_fused:
            q, k, v = (projection(getattr(self, n)) for n in self.qkv_names)
            return _fused_op("lora_qkv")(x, q=q, k=k, v=v)
        return tuple(getattr(self, n)(x) for n in self.qkv_names)

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
        if self.qk_norm:  # per-head norms (Qwen3, Gemma 3): over D, before RoPE
            q = self.q_norm(q.view(B, T, -1, D)).view(B, T, -1)
            k = self.k_norm(k.view(B, T, -1, D)).view(B, T, -1)
        cos, sin = position_embeddings  # (B, T, D)
        q, k = rope(q, k, cos=cos, sin=sin, head_dim=D, inplace=True)
        q = q.view(B, T, -1, D).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, -1, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, -1, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra: dict[str, Any] = {}
        if self.sliding_window:
            extra["sliding_window"] = self.sliding_window
        if self.softcap is not None:
            extra["softcap"] = self.softcap
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
    """Gated MLP (SwiGLU / GeGLU) as one ``lora_mlp`` call; same children as HF's (gate_proj, up_proj, down_proj,
    or Phi-3's packed gate_up_proj and down_proj)."""

    def __init__(self, mlp: nn.Module, spec: ArchSpec, activation: str):
        super().__init__()
        self.packed = spec.role_proj("gate").packed
        self.names = (spec.role_proj("gate").name, "down_proj") if self.packed else ("gate_proj", "up_proj",
                                                                                    "down_proj")
        for n in self.names:
            setattr(self, n, getattr(mlp, n))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = {} if self.activation == "silu" else {"activation": self.activation}
        if self.packed:
            gu, d = (projection(getattr(self, n)) for n in self.names)
            return _fused_op("lora_mlp")(x, gate=None, up=None, down=d, gate_up=gu, **extra)
        g, u, d = (projection(getattr(self, n)) for n in self.names)
        return _fused_op("lora_mlp")(x, gate=g, up=u, down=d, **extra)


# --------------------------------------------------------------------------------------------- fuse_model


def fuse_model(model: nn.Module, *, log: Callable[[str], Any] | None = None) -> FuseReport:
    """Swap the supported modules of a causal LM for fused ones, in place, as its family's ``ArchSpec`` says.

    Call it after the adapters are injected (it reads them through ``.factors()`` at every forward, so training
    the factors needs no re-fuse). Idempotent. Works on a model built on the meta device (nothing is read from the
    weights), which is how ``slimtune estimate`` learns what the trainer will fuse. ``log`` receives the report's
    summary lines.
    """
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None) or type(model).__name__
    report = FuseReport(architecture=str(arch))
    spec = spec_for(config)
    layers = spec.decoder_layers(model) if spec is not None else None
    why = None
    if spec is None or layers is None:
        why = f"unknown architecture {arch!r} (fused: {', '.join(known_model_types())})"
    else:
        why = spec.why_not_fused(config)
    if why is not None:
        report.unfused.append(("model", why))
        _emit(report, log)
        return report
    prefix = spec.decoder
    ops = {"lora_linear": _fused_op("lora_projection", "lora_linear"), "lora_qkv": _fused_op("lora_qkv"),
           "lora_mlp": _fused_op("lora_mlp")}
    act = spec.activation(config)
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        for norm_name, where in spec.layer_norms:
            _fuse_norm(layer, norm_name, f"{base}.{norm_name}", report, spec, save_output=where == "pre")
        _fuse_attention(layer, f"{base}.{spec.attn}", report, spec, ops)
        _fuse_mlp(layer, f"{base}.{spec.mlp}", report, spec, ops["lora_mlp"], act)
    parent, _, leaf = spec.final_norm.rpartition(".")
    _fuse_norm(spec.module(model, parent), leaf, spec.final_norm, report, spec, save_output=False)
    why = lm_head_support(getattr(model, "lm_head", None), spec=spec, config=config)
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


def _norm_why(m: nn.Module | None, spec: ArchSpec) -> str | None:
    if m is None:
        return "no such module"
    if isinstance(m, FusedRMSNorm):
        return None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or _norm_eps(m) is None:
        return f"{type(m).__name__} is not an RMSNorm with a weight and an eps"
    if spec.norm_offset and not _accepts(rms_norm, "offset"):
        return "slimtune.ops.rms_norm has no offset argument (the (1 + w) norm)"
    if (spec.norm_cast == "fp32") != bool(spec.norm_offset):  # the op casts like Gemma exactly when offset != 0
        return f"norm cast {spec.norm_cast!r} with offset {spec.norm_offset:g}: slimtune.ops.rms_norm casts by offset"
    return None


def _fuse_norm(parent: nn.Module, name: str, full: str, report: FuseReport, spec: ArchSpec, *,
               save_output: bool) -> bool:
    m = getattr(parent, name, None)
    why = _norm_why(m, spec)
    if why is not None:
        report.unfused.append((full, why))
        return False
    if not isinstance(m, FusedRMSNorm):
        setattr(parent, name, FusedRMSNorm(m.weight, _norm_eps(m), offset=spec.norm_offset, save_output=save_output))
    report.fused.append(f"{full}: rms_norm")
    return True


def _fuse_attention(layer: nn.Module, full: str, report: FuseReport, spec: ArchSpec, ops: dict) -> None:
    attn = getattr(layer, spec.attn)
    if isinstance(attn, FusedAttention):  # already fused: report again, unchanged
        qkv_ok, o_ok = attn.qkv_fused, attn.o_fused
        if attn.qk_norm:
            for n in ("q_norm", "k_norm"):
                _fuse_norm(attn, n, f"{full}.{n}", report, spec, save_output=False)
    else:
        qkv = spec.role_proj("q")
        names = (qkv.name,) if qkv.packed else tuple(spec.role_proj(r).name for r in ("q", "k", "v"))
        missing = [n for n in names + ("o_proj", "head_dim") if not hasattr(attn, n)]
        if missing:
            report.unfused.append((full, f"{type(attn).__name__} has no {', '.join(missing)}"))
            return
        if spec.qk_norm:  # the norms must fuse before the module is swapped (they sit inside it)
            bad = [(n, _norm_why(getattr(attn, n, None), spec)) for n in ("q_norm", "k_norm")]
            bad = [(n, w) for n, w in bad if w is not None]
            if bad:
                report.unfused.append((full, f"{bad[0][0]}: {bad[0][1]}"))
                return
            for n in ("q_norm", "k_norm"):
                _fuse_norm(attn, n, f"{full}.{n}", report, spec, save_output=False)
        qkv_why = _projections_why(attn, names, ops["lora_linear" if qkv.packed else "lora_qkv"],
                                   "lora_linear" if qkv.packed else "lora_qkv")
        o_why = "slimtune.ops.lora_linear is not available" if ops["lora_linear"] is None else projection_support(
            attn.o_proj)
        qkv_ok, o_ok = qkv_why is None, o_why is None
        if not qkv_ok:
            report.unfused.append((f"{full}.qkv", qkv_why))
        if not o_ok:
            report.unfused.append((f"{full}.o_proj", o_why))
        window = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else spec.sliding_window(
            attn.config)
        softcap = spec.attn_softcap(attn.config)  # Gemma 2: tanh cap of the attention logits (HF's eager takes it)
        setattr(layer, spec.attn, FusedAttention(attn, spec, qkv_fused=qkv_ok, o_fused=o_ok, sliding_window=window,
                                                 softcap=softcap))
    report.fused.append(f"{full}.rope: rope")
    if qkv_ok:
        report.fused.append(f"{full}.qkv: {'lora_linear (packed)' if spec.role_proj('q').packed else 'lora_qkv'}")
    if o_ok:
        report.fused.append(f"{full}.o_proj: lora_linear")


def _projections_why(block: nn.Module, names: tuple[str, ...], op: Callable | None, op_name: str) -> str | None:
    if op is None:
        return f"slimtune.ops.{op_name} is not available"
    for n in names:
        why = projection_support(getattr(block, n))
        if why is not None:
            return f"{n}: {why}"
    return None


def _fuse_mlp(layer: nn.Module, full: str, report: FuseReport, spec: ArchSpec, lora_mlp: Callable | None,
              act: str) -> None:
    mlp = getattr(layer, spec.mlp)
    if isinstance(mlp, FusedMLP):
        report.fused.append(f"{full}: lora_mlp")
        return
    packed = spec.role_proj("gate").packed
    names = (spec.role_proj("gate").name, "down_proj") if packed else ("gate_proj", "up_proj", "down_proj")
    if not all(hasattr(mlp, n) for n in names):
        report.unfused.append((full, f"{type(mlp).__name__} has no {'/'.join(names)}"))
        return
    why = _projections_why(mlp, names, lora_mlp, "lora_mlp")
    if why is None and act not in ("silu", "gelu_tanh"):
        why = f"activation {act!r} (the fused MLP takes silu or gelu_tanh)"
    if why is None and act != "silu" and not _accepts(lora_mlp, "activation"):
        why = f"slimtune.ops.lora_mlp has no activation argument ({act})"
    if why is None and packed and not _accepts(lora_mlp, "gate_up"):
        why = "slimtune.ops.lora_mlp has no gate_up argument (packed gate|up)"
    if why is not None:
        report.unfused.append((full, why))
        return
    setattr(layer, spec.mlp, FusedMLP(mlp, spec, act))
    report.fused.append(f"{full}: lora_mlp" + ("" if act == "silu" else f" ({act})"))



# --------------------------------------------------------------------------------------------- loss


def lm_head_support(head: nn.Module | None, *, spec: ArchSpec | None = None, config: Any = None) -> str | None:
    """None when ``head`` can feed the chunked linear cross-entropy (with the family's final softcap), else why."""
    if head is None:
        return "the model has no lm_head"
    if _is_adapter(head) or _is_adapter_like(head):
        return f"lm_head is an adapter ({type(head).__name__})"
    if not (type(head) is nn.Linear or _is_linear4bit(head)):
        return f"lm_head is a {type(head).__name__}"
    if spec is not None and config is not None and spec.final_softcap(config) is not None \
            and not _accepts(linear_cross_entropy, "softcap"):
        return "slimtune.ops.linear_cross_entropy has no softcap argument (final logit softcapping)"
    return None


def _head_weight(head: nn.Module):
    """The (V, H) weight; a 4-bit head goes in as its ``NF4Weight``, which the loss streams one vocabulary block at a
    time (dequantized in the hidden states' dtype: never a whole V x H copy)."""
    if _is_linear4bit(head):
        return as_nf4_weight(head.weight)
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
    normalise by the target count of the whole accumulated batch. Works on fused and unfused models alike. The
    family's final-logit softcap (Gemma 2: cap · tanh(z / cap)) is applied inside the chunked loss; if the op cannot
    take it, the capped logits are materialised here instead (correct, not memory-saving; fuse_model reports it).
    """
    config = getattr(model, "config", None)
    spec = spec_for(config)
    head = getattr(model, "lm_head", None)
    why = lm_head_support(head)
    if why is not None:
        raise ValueError(f"causal_lm_loss: {why}")
    base = spec.module(model, spec.decoder.rpartition(".")[0]) if spec is not None else model.model
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, H)
    targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(hidden.device)  # (B, T)
    cap = spec.final_softcap(config) if spec is not None else None
    if cap is not None and not _accepts(linear_cross_entropy, "softcap"):
        return _capped_loss(head, hidden, targets, cap, reduction, normalizer, ignore_index)
    extra = {"softcap": float(cap)} if cap is not None else {}
    return linear_cross_entropy(
        hidden, _head_weight(head), targets, bias=head.bias, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, chunk_size=chunk_size, backend=backend, **extra,
    )


def _capped_loss(head, hidden, targets, cap, reduction, normalizer, ignore_index) -> torch.Tensor:
    """Plain-torch loss of softcapped logits (the fallback when the chunked op has no softcap argument)."""
    logits = head(hidden).float()  # (B, T, V)
    logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                                             reduction="sum")
    if reduction == "mean":
        return loss / (targets != ignore_index).sum().clamp_min(1)
    return loss if normalizer is None else loss / normalizer
