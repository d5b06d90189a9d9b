"""Per-rank GPU memory of a data-parallel run (``train.distributed: ddp | fsdp`` on N ranks), from the estimate.

``per_rank(est, nproc, mode, grad_accum)`` turns the single-GPU :class:`~slimtune.bench.estimate.Estimate` into
what one rank holds. The split between what FSDP shards and what stays whole comes from the estimator's own
inventory (``slimtune.bench.inventory``: the meta-device model, with the adapters the trainer injects) and byte
sizes (``slimtune.bench.sizes``), never from model tables. The model follows ``slimtune.train.fsdp``:

ddp
    Every rank runs the one-GPU step on its own micro_batch: the full base, the adapter, its gradients and
    optimizer state, the activations. DDP's gradient buckets are views of the gradients
    (``gradient_as_bucket_view``): no second copy. Per rank = the single-GPU estimate.
fsdp (FSDP2, ``fully_shard`` on every decoder layer and on the decoder module as the root unit)
    Sharded on dim 0 over the N ranks (ceil-chunked: rank 0's shard, the largest, is counted): every decoder
    layer's parameters — the packed 4-bit base weights (in ``quant.quant_storage`` elements; the packed bytes
    are the same for any storage dtype), norms, biases and adapter factors — and the root's own parameter (the final
    norm). A tensor whose dim 0 is unknown here (a 2-D weight or adapter factor) is chunked as ceil(numel / N):
    exact when N divides its dim 0.
    Replicated on every rank: the bitsandbytes quant state of each 4-bit linear (absmax codes, nested absmax,
    code tables: attributes, not parameters), lm_head (outside the sharded module: the chunked loss reads it; an
    NF4 head with its quant state), the frozen input embedding (kept out of FSDP with ``ignored_params``: the
    root unit stays gathered through the step, so a shard would only add to it); an embedding table in host
    memory (``train.embeddings_on: cpu``) stays there.
    Adapter parameters and optimizer state: sharded (each rank steps its shards with the recipe's optimizer,
    ``fsdp.LocalShards``: AdamW, 8-bit AdamW — 32-bit state for a shard under 4096 values —, fp32 masters for
    bf16 adapters; on the host with ``optimizer_on: cpu``). Adapter gradients: with
    grad_accum > 1 the accumulation micro-steps skip the reduce-scatter (``set_requires_gradient_sync(False)``),
    so every rank holds the full unsharded gradients; with grad_accum == 1 the sharded gradients plus one
    layer's full gradients in flight (before its reduce-scatter).
    ``fsdp_unsharded``, the all-gather working set: the layer computing and the one prefetched (2 x one layer's
    unsharded packed base + norms + adapter) and the root unit's unsharded parameters, which the root keeps from
    its forward through the backward (FSDP2 does not reshard the root after forward).
    Activations, logits, dequant scratch and the CUDA context: unchanged (each rank runs its own micro_batch).
    With N = 1 nothing is gathered: per rank = the single-GPU estimate.
    What ``slimtune.train.fsdp`` refuses is refused here with its reason: full fine-tuning, LoRAM, adapters whose
    trainable set changes (LaMDA); and modules_to_save (not modelled here).

Not modelled: NCCL's communicator and all-gather staging buffers, the reduce-scatter output of the optimizer
step's micro-step on top of the accumulated gradients, allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from slimtune.adapters.base import Adapter, get_adapter_class
from slimtune.bench.activations import family
from slimtune.bench.estimate import Estimate, _adapter_config
from slimtune.bench.estimate_view import _LABELS
from slimtune.bench.inventory import ModelInventory, inventory
from slimtune.bench.sizes import GiB, dtype_bytes, optimizer_state_bytes
from slimtune.errors import SlimtuneError

__all__ = ["COMPONENTS", "LABELS", "MODES", "PerRank", "per_rank"]

MODES = ("ddp", "fsdp")
COMPONENTS = (
    "weights_linear", "weights_embed", "weights_other", "adapter_params", "adapter_grads", "optimizer",
    "fsdp_unsharded", "layer_inputs", "activations", "logits", "dequant", "cuda_context",
)
LABELS = {**_LABELS, "fsdp_unsharded": "all-gathered layers in flight"}


@dataclass
class PerRank:
    """What one rank of an N-rank run holds, by component (bytes; rank 0, the largest shard)."""

    mode: str
    nproc: int
    grad_accum: int
    components: dict[str, int]
    single: dict[str, int]  # the single-GPU estimate's components (fsdp_unsharded = 0)
    sharded: dict[str, int] = field(default_factory=dict)  # full bytes of each component that FSDP shards
    notes: list[str] = field(default_factory=list)
    estimate: Estimate | None = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def single_total_bytes(self) -> int:
        return sum(self.single.values())

    @property
    def replicated(self) -> dict[str, int]:
        """Bytes of each component every rank holds whole (the single-GPU bytes less what FSDP shards)."""
        return {k: v - self.sharded.get(k, 0) for k, v in self.single.items()}

    def _cap(self, gpu_mem_gib: float | None) -> int:
        gib = gpu_mem_gib if gpu_mem_gib is not None else (self.estimate.inputs.get("gpu_mem_gib")
                                                           if self.estimate is not None else None)
        if gib is None:
            raise SlimtuneError("no GPU memory given: pass gpu_mem_gib (e.g. --gpu-mem 24)")
        return int(gib * GiB)

    def fits(self, gpu_mem_gib: float | None = None) -> bool:
        return self.total_bytes <= self._cap(gpu_mem_gib)

    def max_seq_len_that_fits(self, gpu_mem_gib: float | None = None) -> int:
        """Longest seq_len (same micro_batch) whose per-rank total fits: the token terms are the single GPU's."""
        if self.estimate is None:
            raise SlimtuneError("per-rank figures without their estimate: no sequence-length solve")
        delta = self.total_bytes - self.single_total_bytes  # sharding changes token-independent terms only
        shifted = replace(self.estimate, fixed_bytes=self.estimate.fixed_bytes + delta)
        return shifted.max_seq_len_that_fits(self._cap(gpu_mem_gib) / GiB)

    def to_json(self, gpu_mem_gib: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode, "nproc": self.nproc, "grad_accum": self.grad_accum,
            "components_bytes": dict(self.components), "single_gpu_components_bytes": dict(self.single),
            "sharded_bytes": dict(self.sharded), "total_bytes": self.total_bytes,
            "total_gib": round(self.total_bytes / GiB, 4), "single_gpu_total_bytes": self.single_total_bytes,
            "notes": list(self.notes),
        }
        try:
            out.update(gpu_mem_gib=self._cap(gpu_mem_gib) / GiB, fits=self.fits(gpu_mem_gib),
                       max_seq_len=self.max_seq_len_that_fits(gpu_mem_gib))
        except SlimtuneError:
            pass
        return out


def per_rank(est: Estimate, nproc: int, mode: str = "ddp", grad_accum: int = 1,
             quant_storage: str = "auto") -> PerRank:
    """Per-rank memory of ``est``'s step on ``nproc`` ranks under ``mode`` ("ddp" | "fsdp"); see the module docstring.

    ``grad_accum``: micro-batches per optimizer step (FSDP keeps unsharded gradients across them when > 1).
    ``quant_storage``: the dtype the packed 4-bit bytes are stored in under FSDP ("auto": the compute dtype); it
    only sets the granularity of the dim-0 chunks.
    """
    if mode not in MODES:
        raise SlimtuneError(f"train.distributed={mode!r}: expected one of {', '.join(MODES)}")
    for name, value in (("nproc", nproc), ("grad_accum", grad_accum)):
        if int(value) != value or value < 1:
            raise SlimtuneError(f"{name}={value!r}: expected a positive integer")
    single = {**est.components(), "fsdp_unsharded": 0}
    single = {k: single[k] for k in COMPONENTS}
    out = PerRank(mode=mode, nproc=nproc, grad_accum=grad_accum, components=dict(single), single=single,
                  estimate=est)
    if nproc == 1:  # one process: nothing is replicated or sharded (slimtune runs the plain step)
        return out
    if mode == "ddp":
        out.notes.append("ddp: every rank holds the full base, the adapter state and its own micro_batch's "
                         "activations; the gradient buckets are views of the gradients (no second copy)")
        return out
    _refuse(est)
    inv = _inventory_of(est)
    storage = 1 if quant_storage == "uint8" else dtype_bytes(
        est.inputs["compute_dtype"] if quant_storage == "auto" else quant_storage)[1]
    parts = _fsdp_parts(est, inv, nproc, grad_accum, storage)
    out.sharded = {k: v[0] for k, v in parts.items()}
    out.components = {k: single[k] - parts[k][0] + parts[k][1] if k in parts else single[k] for k in COMPONENTS}
    if any(v < 0 for v in out.replicated.values()):  # the inventory and the estimate disagree: a bug, say so
        raise SlimtuneError(f"per-rank estimate: sharded bytes exceed the estimate ({out.replicated})")
    out.notes.append(f"fsdp: packed 4-bit base, norms, adapter and its optimizer state sharded over {nproc} ranks; "
                     "quant state, lm_head and the input embedding replicated")
    if grad_accum > 1:
        out.notes.append(f"grad_accum {grad_accum}: accumulation micro-steps skip the reduce-scatter, so every rank "
                         "holds the full unsharded adapter gradients")
    host = est.weights_bytes + est.adapter_param_bytes  # the 4-bit model + adapters, built on the host (CUDA)
    out.notes.append(f"fsdp on CUDA builds the 4-bit base in host memory on every rank before sharding it: "
                     f"{host / GiB:.2f} GiB of RAM per rank while loading ({nproc * host / GiB:.1f} GiB on a node "
                     f"of {nproc})")
    return out


def _refuse(est: Estimate) -> None:
    """What ``slimtune.train.fsdp`` (and its recipe check) refuses, with the same advice."""
    inp = est.inputs
    why = None
    if inp.get("kind") == "full":
        why = "full fine-tuning (adapter.kind: full) is not sharded"
    elif inp.get("loram"):
        why = "LoRAM's pruned model is small: it is not sharded"
    elif get_adapter_class(inp["kind"]).on_step is not Adapter.on_step:
        why = f"{inp['kind']} changes what it trains during training"
    elif (inp.get("adapter_options") or {}).get("modules_to_save"):
        why = "adapter.modules_to_save trains outside the sharded decoder"
    if why:
        raise SlimtuneError(f"train.distributed: fsdp: {why}; use train.distributed: ddp")


def _optimizer_bytes(sizes: list[int], inp: dict[str, Any], a: int) -> int:
    """GPU bytes of the recipe's optimizer over tensors of these sizes, as the estimate counts them (fp32 masters
    for bf16 adapters or a host optimizer; bitsandbytes' 32-bit state under 4096 values: a small shard gets it)."""
    opt = inp["optimizer"]
    if inp.get("optimizer_on") == "cpu":
        return 0  # in host memory (fsdp.LocalShards steps each rank's shards there)
    if inp["adapter_dtype"] != "float32":
        total = 4 * sum(sizes) + optimizer_state_bytes(sizes, opt, 4)
    else:
        total = optimizer_state_bytes(sizes, opt, a)
    return total + (2 * 256 * 4 if opt != "adamw" and sizes else 0)  # the two 256-entry quantization maps


def _inventory_of(est: Estimate) -> ModelInventory:
    """The estimate's own inventory (cached), rebuilt from its inputs; checked against its adapter count."""
    inp = est.inputs
    spec = family(est.config)
    acfg = _adapter_config(spec, inp["kind"], inp["rank"], inp["targets"], inp["layers"], inp["lora_dropout"],
                           inp.get("adapter_options") or {})
    inv = inventory(est.config, acfg, fuse=inp["fused"], loram=inp.get("loram"))
    if inp.get("adapter_params") is None and sum(inv.adapter_trainable) != est.adapter_params:
        raise SlimtuneError(f"per-rank estimate: the rebuilt adapter has {sum(inv.adapter_trainable):,} trainable "
                            f"values, the estimate {est.adapter_params:,} (targets {inp['targets']})")
    return inv


def _chunk(numel: int, n: int, unit: int = 1) -> int:
    """Rank 0's bytes of a tensor of ``numel`` ``unit``-byte elements split into n dim-0 chunks (ceil)."""
    return math.ceil(numel / n) * unit


def _fsdp_parts(est: Estimate, inv: ModelInventory, n: int, grad_accum: int,
                storage: int) -> dict[str, tuple[int, int]]:
    """{component: (bytes FSDP shards, in full; rank 0's bytes of them)} for the components sharding changes."""
    inp = est.inputs
    d = dtype_bytes(inp["compute_dtype"])[1]
    a = dtype_bytes(inp["adapter_dtype"])[1]
    nf4 = inp["quant"] != "none"
    geo = inv.spec.geometry(inv.config)
    num_layers = max(1, len(inv.layers))

    # base linear weights: the packed codes (nf4: one byte per two values, in `storage`-byte elements) are
    # parameters and shard; the quant state (quantized_weight_bytes - packed) and an NF4 lm_head stay whole
    def packed(numel: int) -> int:
        return math.ceil(numel / 2) if nf4 else numel * d

    def packed_shard(numel: int) -> int:
        if not nf4:
            return _chunk(numel, n, d)
        unit = storage if packed(numel) % storage == 0 else 1  # a weight the dtype does not divide stays uint8
        return _chunk(packed(numel) // unit, n, unit)

    linear_full = sum(packed(x) for li in inv.layers for x in li.linear)
    linear_rank = sum(packed_shard(x) for li in inv.layers for x in li.linear)

    # embeddings: the frozen input table is kept out of FSDP (ignored_params: the root unit stays gathered from
    # the decoder's forward through its backward, so a shard would come on top of the whole table); one in host
    # memory is not on the GPU; lm_head is outside the sharded module. (A trained table, modules_to_save, would be
    # sharded; it is refused above.)
    embed_sharded = False
    embed_full = inv.embed_params * d if embed_sharded else 0
    embed_rank = _chunk(geo.vocab, n) * (inv.embed_params // geo.vocab) * d if embed_sharded else 0

    # norms + biases: every layer's and the final norm (the root's)
    other_full = inv.other_params * d
    other_rank = _chunk(inv.other_params, n, d)
    layer_other = max(0, inv.other_params - geo.hidden) // num_layers * d

    # adapter factors, gradients, AdamW state (the state of a shard is a shard)
    trainable = [x for li in inv.layers for ad in li.adapters for x in ad.trainable]
    frozen = [x for li in inv.layers for ad in li.adapters for x in ad.frozen]
    if inp.get("adapter_params") is not None:  # an explicit count: one block of values, as the estimate sizes it
        trainable = [est.adapter_params]
    params_full = (sum(trainable) + sum(frozen)) * a
    params_rank = sum(_chunk(x, n, a) for x in trainable + frozen)
    optim_full = _optimizer_bytes(trainable, inp, a)
    optim_rank = _optimizer_bytes([math.ceil(x / n) for x in trainable], inp, a)  # each rank steps its shards
    grads_full = sum(trainable) * a
    layer_grads = max((sum(x for ad in li.adapters for x in ad.trainable) for li in inv.layers), default=0) * a
    if grad_accum > 1:  # no reduce-scatter until the step's last micro-batch: unsharded gradients on every rank
        grads_full = grads_rank = 0
    else:  # sharded, plus one layer's whole gradients waiting for their reduce-scatter
        grads_rank = sum(_chunk(x, n, a) for x in trainable) + (layer_grads if n > 1 else 0)

    # the all-gather working set: two layers unsharded (computing + prefetched), the root's unsharded parameters
    def layer_full(li) -> int:
        own = sum(x for ad in li.adapters for x in ad.trainable + ad.frozen) * a
        return sum(packed(x) for x in li.linear) + layer_other + own

    heaviest = max((layer_full(li) for li in inv.layers), default=0)
    root_full = embed_full + geo.hidden * d
    gathered = (min(2, len(inv.layers)) * heaviest + root_full) if n > 1 else 0
    return {
        "weights_linear": (linear_full, linear_rank), "weights_embed": (embed_full, embed_rank),
        "weights_other": (other_full, other_rank), "adapter_params": (params_full, params_rank),
        "adapter_grads": (grads_full, grads_rank), "optimizer": (optim_full, optim_rank),
        "fsdp_unsharded": (0, gathered),
    }
