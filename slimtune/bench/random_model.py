"""The benchmark's inputs: a causal LM from a config with seeded random weights (its decoder linears quantized on
the device), and random token ids. Both tools of ``slimtune bench`` start from exactly these.

    base = RandomBase(config, device=torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    base.build()                       # every tensor drawn and quantized on the device, once
    slimtune_model = base.model()      # a fresh module tree over the base's tensors (no copy)
    baseline_model = base.model()      # the same weights again, its own modules and parameters

The weights are drawn on the device by the device's own generator (a CUDA generator on a GPU: no 8 B values
filled by a CPU generator and copied over), one generator per tensor seeded from (seed, tensor name), so a tensor's
values do not depend on the order the model is built in; the same seed gives the same weights on the same kind of
device (a CPU and a GPU draw different values from one seed).
"""

from __future__ import annotations

import copy
import time
import zlib

import torch
import torch.nn as nn

from slimtune.models.streaming import linear4bit, quantized_weight, set_module


def random_tokens(vocab: int, batch: int, seq_len: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """(batch, seq_len) int64 token ids, uniform over the vocabulary, from a fixed seed (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one named tensor: a function of the base seed and the name alone."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class RandomBase:
    """A random base's tensors, drawn once on ``device``; :meth:`model` makes module trees over them.

    Matrices are normal(0, initializer_range), norms ones, biases zeros; the decoder's linears (not lm_head) are
    quantized (``quant``: nf4 / fp4, ``double_quant``) straight from the device copy of one weight at a time, so
    the device never holds a dense copy of the whole model. Every :meth:`model` shares the tensors (a frozen base
    is never written), with its own ``nn.Parameter`` / ``Params4bit`` objects and quant-state objects.
    """

    def __init__(self, config, *, device: torch.device | str, dtype: torch.dtype, quant: str = "nf4",
                 double_quant: bool = True, seed: int = 0):
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.quant, self.double_quant, self.seed = quant, double_quant, seed
        self.std = float(getattr(config, "initializer_range", 0.02) or 0.02)
        self.tensors: dict[str, torch.Tensor | nn.Parameter] = {}  # name -> dense tensor or Params4bit
        self.build_seconds: float | None = None

    # ----------------------------------------------------------------------------------------- public

    def build(self) -> RandomBase:
        """Draw and quantize every tensor now (timed in ``build_seconds``); later models reuse them."""
        if self.build_seconds is None:
            t0 = time.perf_counter()
            self.model()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.build_seconds = time.perf_counter() - t0
        return self

    @property
    def nbytes(self) -> int:
        """Bytes the base's tensors hold (packed 4-bit codes, their quant states, the dense tensors)."""
        total = 0
        for t in self.tensors.values():
            total += t.numel() * t.element_size()
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                total += sum(x.numel() * x.element_size() for x in _state_tensors(qs))
        return total

    def model(self) -> nn.Module:
        """A causal LM over the base's tensors (drawn on the first call), frozen, ``use_cache`` off, train mode."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, attn_implementation="sdpa")
        for name, module in list(model.named_modules()):
            if self.quant != "none" and isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                q = linear4bit(module, mode=self.quant, compute_dtype=self.dtype, double_quant=self.double_quant)
                q.weight = self._weight4(f"{name}.weight", module.weight)
                if module.bias is not None:
                    q.bias = self._param(f"{name}.bias", module.bias)
                set_module(model, name, q)
        for name, p in list(model.named_parameters()):
            if p.is_meta:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, self._param(name, p))
        self._rebuild_buffers(model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"random base: tensors left unmaterialised: {', '.join(left[:5])}")
        model.config.use_cache = False
        model.train()
        return model

    # ----------------------------------------------------------------------------------------- tensors

    def _draw(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The seeded values of one tensor, made on the device by the device's generator."""
        t = torch.empty(like.shape, dtype=like.dtype, device=self.device)
        if like.ndim == 1 and "norm" in name:
            return t.fill_(1.0)
        if name.endswith("bias"):
            return t.zero_()
        gen = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, name))
        return t.normal_(0.0, self.std, generator=gen)

    def _param(self, name: str, like: torch.Tensor) -> nn.Parameter:
        if name not in self.tensors:
            self.tensors[name] = self._draw(name, like)
        return nn.Parameter(self.tensors[name], requires_grad=False)

    def _weight4(self, name: str, like: torch.Tensor) -> nn.Parameter:
        """A Params4bit over the base's packed codes of ``name`` (quantized from its drawn dense weight once)."""
        import bitsandbytes as bnb

        if name not in self.tensors:
            dense = self._draw(name, like)  # (out, in) in the compute dtype, on the device
            self.tensors[name] = quantized_weight(dense, mode=self.quant, double_quant=self.double_quant,
                                                  blocksize=64, device=self.device, dtype=self.dtype)
            del dense
        w = self.tensors[name]
        return bnb.nn.Params4bit(w.data, requires_grad=False, quant_state=copy.copy(w.quant_state),
                                 blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                 quant_type=w.quant_type, quant_storage=w.quant_storage, bnb_quantized=True)

    def _rebuild_buffers(self, model: nn.Module) -> None:
        """Non-persistent buffers (the rotary inv_freq) are not parameters: rebuild the modules that own them on
        the device (their values come from the config alone)."""
        for name, module in list(model.named_modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)) and "rotary" in name.rpartition(".")[2]:
                parent, _, leaf = name.rpartition(".")
                with torch.device(self.device):
                    new = type(module)(config=model.config)
                setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out += _state_tensors(qs.state2)
    return out


def random_base(config, *, device: torch.device, dtype: torch.dtype, quant: str = "nf4", double_quant: bool = True,
                seed: int = 0) -> nn.Module:
    """A causal LM from ``config`` with seeded random weights drawn on ``device``, its decoder linears quantized
    there (one model; :class:`RandomBase` when two models must share one base)."""
    return RandomBase(config, device=device, dtype=dtype, quant=quant, double_quant=double_quant,
                      seed=seed).model()
