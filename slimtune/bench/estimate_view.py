"""Presentation of an ``Estimate``: the JSON the CLI prints (``--json``) and the rich table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimtune.bench.sizes import GB, GiB

if TYPE_CHECKING:  # the dataclass lives in estimate.py, which imports this module
    from slimtune.bench.estimate import Estimate

__all__ = ["format_table", "to_json"]

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
    path = "fused" if est.fused else "HF+PEFT"
    head_nf4 = inp.get("quantize_lm_head") and quant != "none"
    embed = f"{dt}" + (" (tied)" if getattr(est.config, "tie_word_embeddings", False) else "")
    if inp.get("embeddings_on") == "cpu":
        embed = ("lm_head only" if not head_nf4 else "none") + ": the input table is in host memory"
    elif head_nf4:
        embed = f"input table, {dt} (lm_head: NF4, in the linear weights)"
    masters = inp.get("adapter_dtype") != "float32" or inp.get("optimizer_on") == "cpu"
    optim = inp["optimizer"] + (" on fp32 masters" if masters else "")
    if inp.get("optimizer_on") == "cpu":
        optim += ", in host memory"
    return {
        "weights_linear": f"{qdesc}",
        "weights_embed": embed,
        "weights_other": dt,
        "adapter_params": f"{est.adapter_params:,} trainable ({inp['kind']} r{inp['rank']}), {inp['adapter_dtype']}",
        "adapter_grads": inp["adapter_dtype"],
        "optimizer": optim,
        "layer_inputs": inputs_detail,
        "activations": f"{path}: {act} + final norm",
        "logits": ("full (T, V) logits + fp32 log-softmax" if not est.loss_fused
                   else "chunked linear CE, NF4 head streamed by vocabulary block" if head_nf4
                   else "chunked linear CE"),
        "dequant": "none (fused tiles)" if est.fused or quant == "none" else "largest weight, dequantized",
        "cuda_context": "constant",
    }


def to_json(est: Estimate) -> dict[str, Any]:
    """Every figure of the estimate as plain JSON-able values (bytes, plus GiB for reading)."""
    inp = dict(est.inputs)
    inp.pop("adapter_options", None)
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
        "host_bytes": dict(est.host_bytes),
        "host_load_peak_bytes": est.host_load_peak_bytes,
        "host_load_full_bytes": est.host_load_full_bytes,
        "fixed_bytes": est.fixed_bytes,
        "bytes_per_token": est.bytes_per_token,
        "activation_per_token_per_layer": dict(est.activation_per_token_per_layer),
        "bytes_per_token_seq": est.bytes_per_token_seq,
        "fused": est.fused,
        "loss_fused": est.loss_fused,
        "unfused": [list(x) for x in est.unfused],
        "notes": list(est.notes),
    }
    if est.inputs.get("gpu_mem_gib") is not None:
        out["gpu_mem_gib"] = est.inputs["gpu_mem_gib"]
        out["fits"] = est.fits()
        out["max_seq_len"] = est.max_seq_len_that_fits()
        out["advice"] = est.advice()
    return out


# torch's pinned-memory allocator caches what save_on_cpu frees: the RAM stays held (issue 23)
_HOST_NOTES = {"offloaded layer inputs (pinned)": ": the largest step's pinned blocks stay held by torch's host "
               "allocator until the process ends (never returned to the OS)"}


def format_table(est: Estimate):
    """A rich Table of the components, the total and (with a GPU size) the verdict."""
    from rich.table import Table

    inp = est.inputs
    title = (
        f"{est.model}: {inp['quant']} {inp['kind']} r{inp['rank']}, seq {inp['seq_len']} x batch "
        f"{inp['micro_batch']}, checkpointing {inp['grad_checkpointing']}, "
        f"{'fused' if est.fused else 'HF+PEFT'}"
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
    for what, value in est.host_bytes.items():
        table.add_row("host memory", f"{value / GiB:.3f}", what + _HOST_NOTES.get(what, ""))
    table.add_row("host, loading", f"{est.host_load_peak_bytes / GiB:.3f}",
                  f"peak streamed (one tensor + one fp32 chunk); {est.host_load_full_bytes / GiB:.1f} GiB with "
                  "model.load: full")
    if inp.get("gpu_mem_gib") is not None:
        cap = inp["gpu_mem_gib"]
        verdict = "fits" if est.fits() else "does NOT fit"
        table.add_row(f"on {cap:g} GiB", verdict, f"longest seq_len that fits: {est.max_seq_len_that_fits():,}")
        for tip in est.advice():
            table.add_row("", "", f"• {tip}")
    return table
