"""The memory floor: which switches reach which GPU peak (``slimtune estimate --explain``), and the host RAM.

``explain(est)`` starts from the recipe with every memory switch off (the head and the embedding table in the
compute dtype on the GPU, full checkpointing, fp32 AdamW, fp32 adapters) and turns the switches on one after the
other, in the order of what they cost (nothing in accuracy, a little speed; the last one, bf16 adapters with the
optimizer in host memory, moves work to the CPU): each row is the estimate with that switch and every one above
it, with the GPU peak, the host memory the run holds and the longest context at batch 1 on the card, and whether
the recipe has it on. ``host_ram(est)`` lists what lives in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimtune.bench.estimate import Estimate, GiB
from slimtune.errors import SlimtuneError

#: The switches, in order: (label, recipe keys, estimate inputs).
SWITCHES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("NF4 lm_head, streamed", "quant.quantize_lm_head: true", {"quantize_lm_head": True}),
    ("embeddings in host RAM", "train.embeddings_on: cpu", {"embeddings_on": "cpu"}),
    ("offloaded checkpoints", "train.grad_checkpointing: offload", {"grad_checkpointing": "offload"}),
    ("8-bit AdamW", "train.optimizer: adamw8bit", {"optimizer": "adamw8bit"}),
    ("bf16 adapters, optimizer in host RAM", "train.adapter_dtype: bfloat16 + train.optimizer_on: cpu",
     {"adapter_dtype": "bfloat16", "optimizer_on": "cpu"}),
)
#: Every switch off (checkpointing: full, unless the recipe checkpoints nothing).
OFF: dict[str, Any] = {"quantize_lm_head": False, "embeddings_on": "gpu", "optimizer": "adamw",
                       "adapter_dtype": "float32", "optimizer_on": "device"}


@dataclass
class FloorStep:
    label: str
    keys: str
    in_recipe: bool
    gpu_bytes: int
    host_bytes: int
    max_seq_len_batch1: int
    host_bytes_at_max: int  # host memory at that longest context (offloaded inputs grow with it)
    estimate: Estimate


def _row(label: str, keys: str, in_recipe: bool, est: Estimate, gpu_mem_gib: float) -> FloorStep:
    longest = est.reestimate(micro_batch=1, gpu_mem_gib=gpu_mem_gib).max_seq_len_that_fits(gpu_mem_gib)
    at_max = est.reestimate(micro_batch=1, seq_len=max(longest, 1), gpu_mem_gib=gpu_mem_gib)
    return FloorStep(label, keys, in_recipe, est.total_bytes, sum(est.host_bytes.values()), longest,
                     sum(at_max.host_bytes.values()), est)


def explain(est: Estimate, gpu_mem_gib: float = 24.0) -> list[FloorStep]:
    """The floor ladder of ``est``'s recipe: every switch off, then one more switch on per row."""
    changes = dict(OFF)
    if est.inputs["grad_checkpointing"] == "offload":
        changes["grad_checkpointing"] = "full"
    rows = [_row("every memory switch off", "", False, est.reestimate(**changes, gpu_mem_gib=gpu_mem_gib),
                 gpu_mem_gib)]
    for label, keys, change in SWITCHES:
        if "quantize_lm_head" in change and est.inputs.get("quant") == "none":
            continue
        if "grad_checkpointing" in change and est.inputs["grad_checkpointing"] == "none":
            continue  # a recipe without checkpointing: offloading would change the recompute, not only memory
        changes.update(change)
        try:
            nxt = est.reestimate(**changes, gpu_mem_gib=gpu_mem_gib)
        except SlimtuneError:  # e.g. a tied dense head cannot leave its table on the host
            for k in change:
                changes[k] = OFF.get(k, est.inputs[k])
            continue
        in_recipe = all(est.inputs.get(k) == v for k, v in change.items())
        rows.append(_row(label, keys, in_recipe, nxt, gpu_mem_gib))
    return rows


def host_ram(est: Estimate) -> dict[str, int]:
    """Host memory the run holds beyond the process itself (bytes), by what: the load peak, and what stays."""
    out = {"load peak (streamed: one tensor + one quantization chunk)": est.host_load_peak_bytes}
    for name, value in est.host_bytes.items():
        if value:
            out[name] = value
    return out


def format_explain(rows: list[FloorStep], gpu_mem_gib: float):
    """A rich Table of the ladder."""
    from rich.table import Table

    table = Table(title=f"memory floor: one more switch per row; longest context at batch 1 on {gpu_mem_gib:g} GiB")
    for col in ("switch (cumulative)", "recipe key", "in recipe", "GPU GiB", "host GiB", "longest seq",
                "host GiB there"):
        table.add_column(col, justify="right" if "GiB" in col or "seq" in col else "left")
    for r in rows:
        table.add_row(r.label, r.keys, "yes" if r.in_recipe else "", f"{r.gpu_bytes / GiB:.2f}",
                      f"{r.host_bytes / GiB:.2f}", f"{r.max_seq_len_batch1:,}", f"{r.host_bytes_at_max / GiB:.1f}")
    return table
