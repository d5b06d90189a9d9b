"""The estimate's host-RAM line for offloaded layer inputs says that the pinned memory is never returned
(issue 23 item 6): torch's host allocator caches what save_on_cpu frees until the process ends."""

from __future__ import annotations

import io

from rich.console import Console

from slimtune.bench.estimate import GiB, estimate, format_table


def _rows(est) -> str:
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(format_table(est))
    return out.getvalue()


def test_offload_host_line_says_the_pinned_memory_stays_held():
    est = estimate("meta-llama/Llama-3.1-8B", quant="nf4", rank=16, seq_len=2048, micro_batch=2,
                   grad_checkpointing="offload")
    pinned = est.host_bytes["offloaded layer inputs (pinned)"]
    assert pinned == 32 * 2048 * 2 * 4096 * 2
    [line] = [ln for ln in _rows(est).splitlines() if "offloaded layer inputs" in ln]
    assert f"{pinned / GiB:.3f}" in line and "never returned" in line and "until the process ends" in line
    full = estimate("meta-llama/Llama-3.1-8B", quant="nf4", rank=16, seq_len=2048, micro_batch=2,
                    grad_checkpointing="full")
    assert "never returned" not in _rows(full)  # nothing offloaded: no such line
