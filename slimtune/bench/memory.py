"""Activation memory, measured without a GPU: the bytes autograd saves for backward.

``saved_bytes(fn)`` runs ``fn()`` under ``torch.autograd.graph.saved_tensors_hooks`` and records every tensor that
an op (or a custom autograd Function's ``save_for_backward``) saves. Counting rules:

* tensors are deduplicated by storage: a saved view keeps its whole storage alive, so each distinct storage is
  counted once, at its full size (``untyped_storage().nbytes()``), however many times and through however many
  views it is saved;
* storages that belong to parameters or buffers of the ``modules`` passed in (weights, frozen NF4 codes, LoRA
  factors) are counted apart, in ``param_bytes``: they exist whether or not a backward pass follows, so they are
  not activation memory. Without ``modules`` everything counts as activation;
* what a Function keeps as a plain attribute on ``ctx`` instead of ``save_for_backward`` is invisible to the hooks
  (bitsandbytes' 4-bit matmul keeps its weight that way, which is a parameter anyway).

The pack hook returns the tensor itself, so every recorded storage stays alive until the graph is freed and no
two recorded storages can share an address.

``per_token_per_layer`` turns two such measurements into bytes per token per decoder layer: the same model built
with L and 2L decoder layers, run on the same tokens; the difference holds exactly L layers' worth of saved
tensors, and every per-model term (embedding output, final norm, loss/logits, the rotary cos/sin shared by all
layers) cancels.
"""

from __future__ import annotations

import contextlib
import re
import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import Adapter
from slimtune.bench.baseline import hf_decoder
from slimtune.bench.estimate import Estimate
from slimtune.models.embeddings import HostEmbedding
from slimtune.models.streaming import release_host_memory
from slimtune.ops.autotune import MAX_TRIAL_ROWS, shape_bucket, verdicts
from slimtune.ops.dispatch import measures


@dataclass
class SavedBytes:
    """What one forward pass saved for backward."""

    activation_bytes: int  # distinct storages that are not parameters/buffers of the given modules
    param_bytes: int  # distinct storages of parameters/buffers of the given modules
    n_saved: int  # number of pack-hook calls (before deduplication)
    n_storages: int  # distinct storages counted (both kinds)
    by_shape: dict[str, int] = field(default_factory=dict)  # "dtype(shape)" -> activation bytes, for reading

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.param_bytes


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def saved_bytes(fn: Callable[[], Any], *, modules: Iterable[nn.Module] = ()) -> SavedBytes:
    """Run ``fn()`` (a forward pass building an autograd graph) and count the bytes saved for backward.

    The graph ``fn`` builds is dropped on return (call backward inside ``fn`` if it should run). Parameters and
    buffers of ``modules`` are counted in ``param_bytes`` and excluded from ``activation_bytes``.
    """
    param_keys: set[tuple[str, int]] = set()
    for m in modules:
        for p in list(m.parameters()) + list(m.buffers()):
            if p.numel():
                param_keys.add(_storage_key(p))
            qs = getattr(p, "quant_state", None)  # bitsandbytes: absmax & co. are frozen model state too
            for q in _quant_state_tensors(qs):
                param_keys.add(_storage_key(q))

    seen: dict[tuple[str, int], int] = {}
    kinds: dict[tuple[str, int], bool] = {}
    shapes: dict[str, int] = {}
    calls = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if t.numel() == 0 or t.layout != torch.strided:
            return t
        key = _storage_key(t)
        if key not in seen:
            n = t.untyped_storage().nbytes()
            seen[key] = n
            kinds[key] = key in param_keys
            if not kinds[key]:
                label = f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"
                shapes[label] = shapes.get(label, 0) + n
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    del out
    act = sum(n for k, n in seen.items() if not kinds[k])
    par = sum(n for k, n in seen.items() if kinds[k])
    return SavedBytes(act, par, calls, len(seen), dict(sorted(shapes.items(), key=lambda kv: -kv[1])))


def _quant_state_tensors(qs: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    while qs is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if torch.is_tensor(t) and t.numel():
                out.append(t)
        qs = getattr(qs, "state2", None)
    return out


def per_token_per_layer(
    measure: Callable[[int], SavedBytes], *, layers: int, tokens: int
) -> float:
    """Activation bytes per token per decoder layer from ``measure(L)`` and ``measure(2L)``.

    ``measure(n)`` must build the model with ``n`` decoder layers and run one forward pass on ``tokens`` tokens
    under :func:`saved_bytes`. Returns (bytes(2L) − bytes(L)) / (L · tokens).
    """
    one = measure(layers).activation_bytes
    two = measure(2 * layers).activation_bytes
    return (two - one) / (layers * tokens)


# --------------------------------------------------------------------------------------------- memory per phase


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def current_rss() -> int:
    """Resident set size of this process (bytes); 0 when /proc is not there."""
    rss = _proc_status("VmRSS")
    if rss is None:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:  # pragma: no cover
            return 0
    return rss


def _trim_heap() -> None:
    """Give freed heap memory back to the OS, so that RSS follows live memory."""
    release_host_memory()


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS. False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Peak memory per named phase, the max over every time the phase ran.

    CUDA: ``reset_peak_memory_stats`` at the phase start, ``max_memory_allocated`` / ``max_memory_reserved`` at
    its end. CPU: the peak RSS (VmHWM, reset at the phase start through ``/proc/self/clear_refs``; where that is
    refused, a thread samples VmRSS every millisecond), after handing freed heap memory back to the OS.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, float] = {}
        self.method = "cuda" if device.type == "cuda" else ("vmhwm" if _reset_rss_peak() else "sampled")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        sampler = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            _trim_heap()
            _reset_rss_peak()
        else:
            _trim_heap()
            sampler = _RssSampler()
            sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if self.device.type == "cuda":
                now = {"allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                       "reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}
            elif sampler is not None:
                now = {"rss_peak_bytes": sampler.stop()}
            else:
                now = {"rss_peak_bytes": _proc_status("VmHWM") or current_rss()}
            old = self.peaks.get(name, {})
            self.peaks[name] = {k: max(v, old.get(k, 0)) for k, v in now.items()}


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = current_rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.001):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cpu":
        _trim_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def dispatch_lens(seq_lens: Iterable[int], *, batch: int, grow: bool) -> list[int]:
    """The sequence lengths whose forward + backward ask measured dispatch every question a bench will ask: the given
    ones and, with ``grow`` (the max-context search, whose lengths are not known ahead), one per token-count bucket
    above the first, up to ``MAX_TRIAL_ROWS`` (every longer sequence shares that bucket's verdicts)."""
    lens = {int(s) for s in seq_lens}
    if grow and lens:
        rows = shape_bucket(batch * min(lens))
        while rows < MAX_TRIAL_ROWS:
            rows *= 2
            lens.add(-(-rows // batch))
    return sorted(lens)


def decide_backends(loss: Callable[[int], torch.Tensor], seq_lens: Iterable[int], *, device: torch.device,
                    zero_grad: Callable[[], None]) -> int:
    """Forward + backward of ``loss(seq_len)`` at each length before any measured step, gradients dropped, RNG
    restored: measured dispatch (``train.kernels: auto``) runs its trials here, not inside a measured step. Its
    trials used to land in step 1's peaks and in the sweep's and max-context's steps at new shapes, so the figures
    depended on whether the verdict file existed (issue 23). Returns the number of verdicts made."""
    if not measures(device):
        return 0
    before = len(verdicts())
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for seq in seq_lens:
            try:
                loss(seq).backward()
            except torch.OutOfMemoryError:  # that length does not train: its step fails the same way later
                pass
            finally:
                zero_grad()
                free_memory(device)
    return len(verdicts()) - before


# --------------------------------------------------------------------------------------------- saved bytes


class _Stop(Exception):
    pass


@contextlib.contextmanager
def recording_offload() -> Iterator[dict[str, int]]:
    """Count what ``torch.autograd.graph.save_on_cpu`` (offloaded checkpointing) keeps in host memory.

    ``slimtune.train.checkpointing`` looks ``save_on_cpu`` up at every call, so a recording subclass is swapped in
    for the duration: every tensor it packs is counted once per host storage (on CUDA each pack is a fresh pinned
    copy of the tensor; on CPU the tensor itself, deduplicated by storage).
    """
    record = {"bytes": 0, "tensors": 0}
    seen: set[int] = set()
    original = torch.autograd.graph.save_on_cpu

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def recording_pack(t: torch.Tensor):
                out = pack(t)
                host = out[1]
                st = host.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    record["bytes"] += st.nbytes()
                    record["tensors"] += 1
                return out

            self.pack_hook = recording_pack

    torch.autograd.graph.save_on_cpu = Recording
    try:
        yield record
    finally:
        torch.autograd.graph.save_on_cpu = original


def measure_layer(model: nn.Module, ids: torch.Tensor, *, index: int = -1) -> dict[str, int]:
    """What one decoder layer saves for backward on its real input, without checkpointing (bytes).

    The layer's inputs are captured from a no-grad forward (a pre-hook), the hidden state is given
    ``requires_grad`` (as for every layer after the first in training), and the layer runs once under
    :func:`saved_bytes`. ``saved``: its own saved tensors, parameters excluded, and the tensors it receives from
    the model (rotary cos/sin, masks) excluded too: they are computed once and shared by every layer;
    ``shared_inputs``: those shared tensors (distinct storages). ``saved`` is also what a checkpointed layer holds
    while it is recomputed in backward.
    """
    decoder = hf_decoder(model)
    layer = decoder.layers[index]
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    args, kwargs = list(captured["args"]), dict(captured["kwargs"])
    hidden = args.pop(0) if args else kwargs.pop("hidden_states")
    x = hidden.detach().clone().requires_grad_(True)
    shared = nn.Module()
    storages: dict[int, int] = {}
    tensors = [t for v in list(args) + list(kwargs.values()) for t in (v if isinstance(v, (tuple, list)) else (v,))
               if torch.is_tensor(t)]
    for i, t in enumerate(tensors):
        shared.register_buffer(f"t{i}", t, persistent=False)
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    was = getattr(layer, "gradient_checkpointing", False)
    if was:
        layer.gradient_checkpointing = False
    try:
        res = saved_bytes(lambda: layer(x, *args, **kwargs), modules=[model, shared])
    finally:
        if was:
            layer.gradient_checkpointing = True
    return {"saved": res.activation_bytes, "shared_inputs": sum(storages.values())}


def layer_saved_bytes(model: nn.Module, ids: torch.Tensor, *, index: int = -1) -> int:
    """``measure_layer(...)["saved"]``: bytes one decoder layer saves for backward (shared inputs excluded)."""
    return measure_layer(model, ids, index=index)["saved"]


def measure_activation_term(model: nn.Module, ids: torch.Tensor, mode: str, *,
                            layer: dict[str, int] | None = None) -> dict[str, int]:
    """What autograd keeps for backward through the decoder (layers + final norm), in checkpointing ``mode``.

    * ``device_saved``: :func:`saved_bytes` around the decoder's forward. Without checkpointing that is every
      layer's saved tensors (the shared rotary cos/sin among them, once); with ``full`` checkpointing it is what
      ``checkpoint`` keeps (each layer's input) plus the final norm; with ``offload`` the layer inputs go to
      ``save_on_cpu`` instead (its hooks are innermost, so they never reach the outer counting hook) and only the
      final norm stays;
    * ``host_saved``: the layer inputs ``save_on_cpu`` keeps (``offload`` only), see :func:`recording_offload`;
    * ``recompute_layer`` (``full`` / ``offload``): what one layer saves while it is recomputed in backward
      (:func:`measure_layer` on the last layer): the checkpointed layers' activations exist one layer at a time;
    * ``shared_inputs`` (``full`` / ``offload``): the rotary cos/sin and position ids the checkpointed layers
      hold for their recompute (kept alive until backward, counted once).

    ``total`` is their sum: the quantity the estimator's activation term models (layer inputs + activations,
    with the offloaded inputs counted in host memory). ``layer``: a :func:`measure_layer` result already taken on
    the same ``ids`` (not measured again).
    """
    decoder = hf_decoder(model)
    with recording_offload() as host:
        r = saved_bytes(lambda: decoder(input_ids=ids, use_cache=False).last_hidden_state, modules=[model])
    out = {"device_saved": r.activation_bytes, "host_saved": int(host["bytes"]), "recompute_layer": 0,
           "shared_inputs": 0}
    if mode != "none":
        layer = layer if layer is not None else measure_layer(model, ids)
        out["recompute_layer"], out["shared_inputs"] = int(layer["saved"]), int(layer["shared_inputs"])
    out["total"] = sum(out.values())
    return out


def estimated_activation_term(est: Estimate) -> dict[str, int]:
    """The estimator's side of :func:`measure_activation_term` (bytes).

    ``layer_inputs`` (checkpointed inputs kept on the device) + ``activations`` (every layer, or the one being
    recomputed, with rope and the final norm) + ``offloaded`` (inputs in pinned host memory). With ``offload``
    the estimator also reserves two layer inputs in flight on the GPU (copy-back buffers); they are transient
    copies, not saved tensors, so they are reported apart (``in_flight``) and not compared here.
    """
    mode = est.inputs["grad_checkpointing"]
    if mode == "offload":
        out = {"layer_inputs": 0, "activations": est.activation_bytes, "offloaded": est.cpu_offload_bytes,
               "in_flight": est.layer_input_bytes}
    else:
        out = {"layer_inputs": est.layer_input_bytes, "activations": est.activation_bytes, "offloaded": 0,
               "in_flight": 0}
    out["total"] = out["layer_inputs"] + out["activations"] + out["offloaded"]
    return out


def gap_pct(estimated: float, measured: float) -> float | None:
    """(estimated − measured) / measured in %, rounded to 0.1 (None without a measurement)."""
    if not measured:
        return None
    return round(100.0 * (estimated - measured) / measured, 1)


# --------------------------------------------------------------------------------------------- held state


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               device: torch.device | str | None = None) -> dict[str, int]:
    """What a model (and its optimizer) really hold, by the estimator's component names, counted by storage.

    Every distinct storage is counted once, at its full size, in the first matching class:

    * ``weights_linear``: base linear weights (dense, or bitsandbytes' packed 4-bit codes plus every quant-state
      tensor: absmax, code tables, double-quant offset and second-level state), a 4-bit lm_head included;
    * ``weights_embed``: the input embedding table and a dense lm_head (tied: once);
    * ``weights_other``: every other parameter of the base (norms, biases);
    * ``adapter_params``: adapter tensors (trainable and frozen); ``adapter_grads``: the ``.grad`` of trainable
      parameters; ``optimizer``: optimizer state tensors, with :class:`~slimtune.train.optim.MasterWeights`' fp32
      masters.

    What lives in host memory by construction is counted under ``host_<class>``: the table of a
    :class:`~slimtune.models.embeddings.HostEmbedding` (``train.embeddings_on: cpu``) and the masters and state of a
    :class:`~slimtune.train.optim.MasterWeights` kept on the CPU (``train.optimizer_on: cpu``), and so is any other
    storage that is not on ``device`` (default: the device of the first parameter), so the split holds on a
    CPU-only machine too. Buffers that are not parameters (rotary tables) are not counted; neither does the
    estimator.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    out: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()

    def add(kind: str, t: torch.Tensor | None, host: bool = False) -> None:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            return
        key = _storage_key(t)
        if key in seen:
            return
        seen.add(key)
        name = f"host_{kind}" if host or t.device.type != dev.type else kind
        out[name] = out.get(name, 0) + t.untyped_storage().nbytes()

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for p in model.parameters():  # gradients first: they are what they are whatever holds the parameter
        add("adapter_grads", p.grad)
    base_linears: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Adapter):
            for n, p in m.named_parameters():
                if not n.startswith("base_layer."):
                    add("adapter_params", p)
            base_linears.append(m.base_layer)
    for m in model.modules():
        if m is not head and (isinstance(m, nn.Linear) or hasattr(getattr(m, "weight", None), "quant_state")):
            base_linears.append(m)
    for m in base_linears:
        w = m.weight
        if m is head and not hasattr(w, "quant_state"):
            continue
        add("weights_linear", w)
        for q in _quant_state_tensors(getattr(w, "quant_state", None)):
            add("weights_linear", q)
    if head is not None and hasattr(head.weight, "quant_state"):
        for q in _quant_state_tensors(head.weight.quant_state):
            add("weights_linear", q)
        add("weights_linear", head.weight)
    if emb is not None:
        add("weights_embed", emb.weight, host=isinstance(emb, HostEmbedding))
    if head is not None:
        add("weights_embed", head.weight)
    for p in model.parameters():
        add("weights_other", p)
    if optimizer is not None:
        inner = getattr(optimizer, "inner", None)
        on_host = getattr(getattr(optimizer, "device", None), "type", None) == "cpu"
        for opt in (optimizer, inner) if inner is not None else (optimizer,):
            for state in opt.state.values():
                for v in state.values():
                    add("optimizer", v, host=on_host)
        if inner is not None:
            for g in inner.param_groups:
                for m in g["params"]:
                    add("optimizer", m, host=on_host)
    return out
