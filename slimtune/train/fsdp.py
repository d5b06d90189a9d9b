"""Sharded data parallel (``train.distributed: fsdp``): torch FSDP2 (``fully_shard``) over the 4-bit base and the
adapters, for bases that do not fit one card even in 4-bit.

What is sharded, and how (``shard_model``):

- **Every decoder layer** is its own FSDP unit, and the decoder module itself (``model.model`` for Llama) the root
  unit: each of their parameters is split on dim 0 over the ranks — the packed 4-bit base weights (stored as
  ``quant.quant_storage``; ``auto`` = the compute dtype, so one all-gather carries a layer's base, norms and
  adapter in one dtype), the norms, the adapter factors and a trained ``embed_tokens``. A layer is all-gathered
  just before its forward (and again before its backward) and freed after it.
- **Replicated on every rank**: the bitsandbytes quant state of each 4-bit linear (absmax codes and their scales:
  attributes, not parameters — about 1/64 byte per weight with double quant, 3% of the packed bytes), ``lm_head``
  (outside the sharded module: the chunked loss reads its weight directly) and a frozen embedding table (kept out
  of FSDP with ``ignored_params``: FSDP2 keeps the root unit gathered from the decoder's forward through its
  backward, so sharding it would save nothing at the peak). ``slimtune estimate --nproc N`` counts exactly this split.
- **Loading.** On CUDA every rank builds and quantizes the base in host memory (``Trainer._load``: host RAM for
  the whole 4-bit model per rank, ~37 GiB for Llama-3.1-70B) and ``fully_shard`` moves each layer to its GPU as it
  shards it; what FSDP does not manage follows (``_place_rest``). A base that does not fit one card is never on one
  whole. The adapters are then initialised from the CPU generator: the same seed gives another (equally
  distributed) initial ``A`` than a one-GPU run.
- **bitsandbytes under FSDP.** An all-gathered weight is a plain tensor, no longer a ``Params4bit``: its quant state
  is put back (``Linear4bit.quant_state``, bitsandbytes' own place for it) by a forward pre-hook on each layer that
  runs after FSDP's all-gather, so the fused ops and ``Linear4bit.forward`` read the same NF4 weight as in one
  process.
- **Gradients** are reduce-scattered as a plain sum (``set_gradient_divide_factor(1)``; sum-only collectives, which
  gloo requires and NCCL prefers): the loss is already normalised by the global step's target tokens, as under DDP.
  Accumulation micro-steps skip the reduce-scatter (``set_requires_gradient_sync(False)``): one per optimizer step.
- **The optimizer** (``LocalShards``) steps each rank's shards with the recipe's own optimizer — torch AdamW,
  bitsandbytes' 8-bit AdamW, fp32 masters for bf16 adapters, on the device or the host — over plain tensors that
  share the shards' storage; gradient clipping sees the global norm. 8-bit AdamW quantizes its state in blocks of
  each rank's shard: close to, not bit-equal to, one process.
- **Files.** A checkpoint gathers the adapter (``full_parameters``: every trainable or adapter-owned parameter
  all-gathered, one at a time — never a whole layer of base weights) in the one-process format, and every rank's
  optimizer state (its shards) to rank 0, which writes both. A resume reads the same files on every rank: the
  whole adapter goes back into the shards (``full_parameters(write_back=True)``), each rank takes its optimizer
  state.
- **Evaluation** (``eval``, ``train.eval_every``) runs on every rank together — the sharded model's forward is a
  collective — over the same records; rank 0 writes the numbers.

Not sharded here: full fine-tuning (``adapter.kind: full``), LoRAM (its pruned model is small: use ddp), adapters
whose trainable set changes during training (LaMDA) — the recipe check refuses them with the reason.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from slimtune.adapters.base import Adapter
from slimtune.errors import SlimtuneError
from slimtune.models.arch import spec_for
from slimtune.train.optim import PairedOptimizer

try:  # bitsandbytes is a dependency; the guard keeps this module importable where its native library is broken
    from bitsandbytes.nn import Linear4bit
except Exception:  # pragma: no cover
    Linear4bit = ()  # type: ignore[assignment,misc]

__all__ = ["shard_model", "fsdp_units", "full_parameters", "LocalShards", "to_cpu", "full_value", "check_adapters"]


def check_adapters(adapters: dict[str, Adapter]) -> None:
    """Refuse adapter kinds whose trainable set changes during training (``on_step`` overridden: LaMDA freezes B)."""
    moving = sorted({type(a).__name__ for a in adapters.values() if type(a).on_step is not Adapter.on_step})
    if moving:
        raise SlimtuneError(f"train.distributed: fsdp: {', '.join(moving)} changes what it trains during training, "
                            f"which FSDP's sharded optimizer state does not follow; use train.distributed: ddp")


def _restore_quant_state(linears: list[nn.Module]):
    """A forward pre-hook for an FSDP unit: the all-gathered (plain) weight of each 4-bit linear gets its quant state
    back (FSDP's own pre-hook runs first: it was registered first)."""

    def hook(module: nn.Module, args: Any) -> None:
        for lin in linears:
            w = lin.weight
            if not isinstance(w, DTensor) and getattr(w, "quant_state", None) is None:
                w.quant_state = lin.quant_state

    return hook


def _quantized(module: nn.Module) -> list[nn.Module]:
    out = [m for m in module.modules() if isinstance(m, Linear4bit)]
    for lin in out:  # bitsandbytes' fallback slot (fix_4bit_weight_quant_state_from_module reads it too)
        if getattr(lin, "quant_state", None) is None:
            lin.quant_state = lin.weight.quant_state
    return out


def shard_model(model: nn.Module, device: torch.device, world: int, *, embeddings_on_host: bool = False) -> None:
    """``fully_shard`` every decoder layer, then the decoder module as the root unit (see the module docstring).

    Raises ``SlimtuneError`` for a model family without a spec, and for trainable parameters left outside the
    sharded module (``adapter.modules_to_save: [lm_head]``, a trained tied embedding): they would need a second,
    replicated reduction.
    """
    spec = spec_for(getattr(model, "config", None))
    layers = spec.decoder_layers(model) if spec is not None else None
    if spec is None or layers is None:
        raise SlimtuneError(f"train.distributed: fsdp: no family spec for {type(model).__name__} (its decoder layers "
                            f"are the FSDP units); use train.distributed: ddp")
    mesh = init_device_mesh(device.type, (world,))
    # FSDP2 warns on every forward that the decoder returns a view (an in-place op on it would skip the backward
    # all-gather); the chunked loss and the head only read it
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    root = spec.module(model, spec.decoder.rpartition(".")[0])  # (model.model): the module causal_lm_loss calls
    for layer in layers:
        linears = _quantized(layer)
        fully_shard(layer, mesh=mesh)
        layer.register_forward_pre_hook(_restore_quant_state(linears))
    embed = model.get_input_embeddings()
    # a frozen input table stays whole (the root unit is gathered from the decoder's forward through its backward,
    # so a sharded table would cost its shard on top of the whole); a trained one is sharded and reduced
    ignored = {embed.weight} if embed is not None and (not embed.weight.requires_grad or embeddings_on_host) else set()
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    linears = [m for m in _quantized(root) if id(m) not in in_layers]  # a 4-bit linear of the root's own
    fully_shard(root, mesh=mesh, ignored_params=ignored or None)
    root.register_forward_pre_hook(_restore_quant_state(linears))
    _place_rest(model, device, keep=model.get_input_embeddings() if embeddings_on_host else None)
    for unit in fsdp_units(model):
        unit.set_gradient_divide_factor(1.0)  # a plain sum: the loss is normalised by the global target tokens
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; NCCL copies sums without staging
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if outside:
        raise SlimtuneError(f"train.distributed: fsdp: {outside[0]} trains outside the sharded decoder "
                            f"({len(outside)} such tensors: adapter.modules_to_save lm_head or a tied embedding); "
                            f"use train.distributed: ddp")


def _place_rest(model: nn.Module, device: torch.device, keep: nn.Module | None) -> None:
    """What FSDP does not manage (lm_head, the ignored input table) goes to ``device`` too: on CUDA the base was
    loaded in host memory (``Trainer._load``), and ``fully_shard`` moved only the units' own parameters and buffers.
    A tensor shared by two modules (tied embeddings) moves once; a ``Params4bit`` takes its quant state along;
    ``keep`` (the host-resident embedding) stays."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if module is keep:
            continue
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or isinstance(t, DTensor) or t.device == device:
                    continue
                if id(t) not in moved:
                    new = t.to(device)
                    if isinstance(t, nn.Parameter) and not isinstance(new, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    moved[id(t)] = new
                table[name] = moved[id(t)]
    for lin in (m for m in model.modules() if isinstance(m, Linear4bit)):
        if getattr(lin, "quant_state", None) is not None and not isinstance(lin.weight, DTensor):
            lin.quant_state = lin.weight.quant_state  # the moved Params4bit's (the same object, moved in place)


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """The FSDP units of a sharded model (layers first, the root last)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return units[1:] + units[:1]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter the gradients in this micro-step's backward (the step's last), or keep accumulating them."""
    for unit in fsdp_units(model):
        unit.set_requires_gradient_sync(enabled, recurse=False)


def _gathered(name: str, p: nn.Parameter) -> bool:
    """Parameters a checkpoint or an export reads: the trainable ones and every adapter factor (a stacked frozen
    adapter's too), never the frozen base."""
    return isinstance(p, DTensor) and (p.requires_grad or any(part.startswith("lora_") for part in name.split(".")))


def _local_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of ``full`` as FSDP splits it (dim-0 chunks; no communication)."""
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


@contextlib.contextmanager
def full_parameters(model: nn.Module, *, write_back: bool = False) -> Iterator[None]:
    """Inside: the adapter's parameters are whole plain tensors on every rank (a collective: every rank enters).

    Each sharded adapter parameter is all-gathered (one at a time) and put in its module in place of the shard;
    the shards come back on exit. ``write_back``: what was loaded into the whole tensors meanwhile (a resume) is
    copied into each rank's shard first.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not _gathered(f"{mod_name}.{pname}", p):
                continue
            whole = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
            module._parameters[pname] = whole
            swapped.append((module, pname, p, whole))
    try:
        yield
    finally:
        for module, pname, shard, whole in swapped:
            if write_back:
                with torch.no_grad():
                    shard.to_local().copy_(_local_shard(whole.detach(), shard))
            module._parameters[pname] = shard


def full_value(t: torch.Tensor | float) -> torch.Tensor | float:
    """A DTensor's global value (a collective); anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class LocalShards(PairedOptimizer):
    """Steps this rank's shards of FSDP-sharded parameters with a plain optimizer over plain tensors.

    ``make_inner(local_params)`` builds any of ``slimtune.train.optim.build_optimizer``'s optimizers (torch AdamW,
    bitsandbytes' 8-bit AdamW, ``MasterWeights`` with its fp32 masters on the device or the host) over tensors that
    share storage with each DTensor's local shard: its in-place updates are the sharded parameters' updates, and
    optimizers that know nothing of DTensors work unchanged. This optimizer's ``param_groups`` hold the DTensors,
    so clipping (the global norm), ``zero_grad`` and the lr schedule see the model's parameters. Its state is the
    inner optimizer's for this rank's shards (``state_dict``); a checkpoint holds every rank's
    (``slimtune.train.distributed.DistContext.optimizer_state``).
    """

    def __init__(self, params: list[nn.Parameter], make_inner):
        params = list(params)
        local = [nn.Parameter(p.to_local() if isinstance(p, DTensor) else p.detach(), requires_grad=True)
                 for p in params]  # (shard rows, ...): the same storage as the shard, no copy
        back = {id(lp): p for lp, p in zip(local, params)}
        self.inner = make_inner(local)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [back[id(lp)] for lp in g["params"]]}
                  for g in self.inner.param_groups]
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._sync_hyperparameters()  # the lr the schedule set
        for p, lp in self._pairs():
            g = p.grad
            # a rank may hold no rows of a tensor (a rank-1 adapter's A over 2 ranks): without a gradient the inner
            # optimizer skips it, where bitsandbytes' CUDA kernels would launch an empty grid ("invalid configuration
            # argument", issue 23); the shard stays in the groups, so clipping and zero_grad see every parameter
            lp.grad = None if g is None or lp.numel() == 0 else (g.to_local() if isinstance(g, DTensor) else g)
        self.inner.step()
        for _, lp in self._pairs():
            lp.grad = None
        return loss

    def state_dict(self) -> dict:
        self._sync_hyperparameters()
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        self._adopt_hyperparameters()


def to_cpu(obj: Any) -> Any:
    """``obj`` (a state dict) with every tensor moved to the host, for gathering it to rank 0 as an object."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
