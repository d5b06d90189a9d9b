"""A bench report folder: report.json (every figure), report.md (Markdown tables), PNG plots (matplotlib, Agg).

    paths = write_report(result, "bench/results/cpu-2025-01-01")   # result = slimtune.bench.runner.run_bench(...)

Plots: ``memory_by_phase.png`` (peak memory per phase, slimtune vs baseline, grouped bars) and
``memory_vs_seq.png`` (peak allocated memory of one step on CUDA, or the bytes saved for backward on CPU, against
the sequence length; measured as solid lines, the estimator's as dashed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.bench.bench_config import PHASES, TOOLS, memory_key

MiB = 2**20
LABELS = {"slimtune": "slimtune", "baseline": "HF + PEFT + bnb"}


def _mib(n: float | int | None, digits: int = 1) -> str:
    return "–" if n is None else f"{n / MiB:,.{digits}f}"


def _num(x: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f} %"


def _mem_label(result: dict[str, Any]) -> str:
    key = memory_key(next(iter(result["tools"].values())))
    return "peak allocated, MiB" if key == "allocated_bytes" else "peak RSS above start, MiB"


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown: settings, the main table (rows = tool, columns = figures, and the ratio), the
    estimate-vs-measured table, the sequence-length sweep and the environment."""
    env, model, st = result["environment"], result["model"], result["settings"]
    tools = result["tools"]
    key = memory_key(next(iter(tools.values())))
    cuda = key == "allocated_bytes"
    lines = [
        f"# slimtune bench: {model['config']} on {env['device_name']}",
        "",
        f"{model['model_type']}, {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
        f"MLP {model['intermediate_size']}, heads {model['num_attention_heads']}/{model['num_key_value_heads']}, "
        f"vocab {model['vocab_size']:,} ({model['parameters']:,} parameters, random weights from the config); "
        f"{st['quant']}, {st['dtype']} compute; {st['adapter']} r{st['rank']} alpha {st['alpha']:g} on "
        f"{', '.join(st['targets'])}; seq {st['seq_len']} x batch {st['batch']}; {st['optimizer']}; "
        f"{st['steps']} steps ({st['warmup']} warm-up). slimtune checkpointing: {st['slimtune_checkpointing']}; "
        f"baseline: {st['baseline_checkpointing']}." + (f" Training loop: {st['loop']}." if st.get("loop") else ""),
        "",
    ]
    # ---- main table ------------------------------------------------------------------------------------------
    cols = [f"{ph} ({_mem_label(result)})" for ph in PHASES]
    if cuda:
        cols += ["reserved peak, MiB"]
    cols += ["tokens/s", "saved B / token / layer", "activation kept, MiB", "kept by the whole step, MiB"]
    cols += ["max context (measured)" if cuda else "max context (estimate)"]
    lines += ["| tool | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for tool in TOOLS:
        t = tools.get(tool)
        if t is None:
            continue
        cells = [_mib(t["phases"].get(ph, {}).get(key)) for ph in PHASES]
        if cuda:
            cells.append(_mib(max((p.get("reserved_bytes", 0) for p in t["phases"].values()), default=None)))
        cells += [
            "OOM" if t.get("oom") else _num(t.get("tokens_per_second"), "{:,.1f}"),
            _num(t.get("saved_bytes_per_token_per_layer"), "{:,.1f}"),
            _mib(t["activation"]["measured"]["total"], 2),
            _mib(t.get("saved_bytes_step"), 2),
            _num(t["max_context"].get("measured") if cuda else t["max_context"].get("estimated")),
        ]
        lines.append(f"| {LABELS[tool]} | " + " | ".join(cells) + " |")
    r = result.get("ratios") or {}
    if r:
        cells = [_ratio(r.get(f"{ph}_{key}")) for ph in PHASES]
        if cuda:
            s_res = max((p.get("reserved_bytes", 0) for p in tools["slimtune"]["phases"].values()), default=0)
            b_res = max((p.get("reserved_bytes", 0) for p in tools["baseline"]["phases"].values()), default=0)
            cells.append(_ratio(s_res / b_res if b_res else None))
        cells += [_ratio(r.get("tokens_per_second")), _ratio(r.get("saved_bytes_per_token_per_layer")),
                  _ratio(r.get("activation_measured")), _ratio(r.get("saved_bytes_step")),
                  _ratio(r.get("max_context_measured") if cuda else r.get("max_context_estimated"))]
        lines.append("| ratio slimtune / baseline | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Memory per phase is the max over all steps; " + (
            "CUDA `max_memory_allocated` after `reset_peak_memory_stats` at each phase start."
            if cuda else
            "on CPU the process's peak RSS (VmHWM, reset at each phase start) above its RSS before the tool's "
            "model was built; both tools run in one process, one after the other."),
        "tokens/s: median over the steps after warm-up. Saved bytes: `saved_tensors_hooks`, one decoder layer "
        "without checkpointing (parameters and the shared rotary cos/sin excluded). Activation kept: what autograd "
        "keeps through the decoder in the tool's checkpointing mode (device + host, plus one recomputed layer). "
        "Kept by the whole step: the same for a forward with the loss (HF: the fp32 log-softmax of the (T, V) "
        "logits; slimtune's chunked loss keeps dx), without the recomputed layer.",
        "",
    ]
    # ---- estimate vs measured --------------------------------------------------------------------------------
    lines += ["## Estimate vs measured", "",
              "| tool | checkpointing | term | estimated | measured | gap |", "|---|---|---|---|---|---|"]
    for tool in TOOLS:
        t = tools.get(tool)
        if t is None:
            continue
        a = t["activation"]
        lines.append(f"| {LABELS[tool]} | {a['mode']} | activation term (MiB) | {_mib(a['estimated']['total'], 3)} | "
                     f"{_mib(a['measured']['total'], 3)} | {_pct(a['gap_pct'])} |")
        p = a["per_token_per_layer"]
        lines.append(f"| {LABELS[tool]} | none | saved B / token / layer | {_num(p['estimated'], '{:,.1f}')} | "
                     f"{_num(p['measured'], '{:,.1f}')} | {_pct(p['gap_pct'])} |")
        e = t["estimate"]
        if "peak_allocated_bytes" in e:
            lines.append(f"| {LABELS[tool]} | {a['mode']} | peak allocated (MiB, estimate without CUDA context) | "
                         f"{_mib(e['total_bytes'] - e['cuda_context_bytes'])} | {_mib(e['peak_allocated_bytes'])} | "
                         f"{_pct(e['peak_gap_pct'])} |")
    lines += [
        "",
        "gap = (estimated − measured) / measured; target within ±10 % for slimtune. Measured activation term = "
        "saved tensors at the end of the decoder's forward (layer inputs kept by `checkpoint`, or by `save_on_cpu` "
        "in host memory with offload) + what one layer saves while recomputed + the rotary cos/sin the checkpointed "
        "layers hold. The estimator's two in-flight copy-back buffers of offload are GPU transients, not saved "
        "tensors, and are not in this comparison.",
        "",
    ]
    # ---- sweep -----------------------------------------------------------------------------------------------
    first = next(iter(tools.values()))
    if first.get("seq_sweep"):
        metric = first["seq_sweep"][0]["metric"]
        lines += [f"## {metric} vs sequence length (MiB)", "",
                  "| seq_len | " + " | ".join(f"{LABELS[t]} measured | {LABELS[t]} estimated" for t in TOOLS
                                              if t in tools) + " |",
                  "|" + "---|" * (1 + 2 * len(tools))]
        for i, row in enumerate(first["seq_sweep"]):
            cells = []
            for t in TOOLS:
                if t in tools:
                    rr = tools[t]["seq_sweep"][i]
                    cells += ["OOM" if rr["measured_bytes"] is None else _mib(rr["measured_bytes"], 3),
                              _mib(rr["estimated_bytes"], 3)]
            lines.append(f"| {row['seq_len']} | " + " | ".join(cells) + " |")
        lines.append("")
    # ---- max context -----------------------------------------------------------------------------------------
    if cuda and any(t["max_context"].get("measured") is not None for t in tools.values()):
        lines += ["## Longest sequence under the memory cap", ""]
        for tool in TOOLS:
            if tool in tools:
                mc = tools[tool]["max_context"]
                lines.append(f"- {LABELS[tool]}: {_num(mc.get('measured'))} tokens x batch {st['batch']} under "
                             f"{mc['cap_gib']:g} GiB (memory fraction {mc.get('memory_fraction')}; estimate "
                             f"{_num(mc.get('estimated'))})")
        lines.append("")
    # ---- fuse report and environment -------------------------------------------------------------------------
    fuse = tools.get("slimtune", {}).get("fuse_report")
    if fuse:
        lines += ["## slimtune fused path", ""] + [f"- {ln}" for ln in fuse] + [""]
    lines += ["## Environment", ""]
    for k in ("device_name", "torch", "triton", "bitsandbytes", "transformers", "peft", "python", "cuda", "git_sha",
              "load_average_1min"):
        if env.get(k) is not None:
            lines.append(f"- {k}: {env[k]}")
    lines.append(f"- command: `slimtune bench {' '.join(result['command']['argv'])}`")
    lines.append(f"- created: {result['created']} ({result.get('wall_seconds', '?')} s)")
    return "\n".join(lines) + "\n"


def plot_phases(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: peak memory per phase, one bar per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in TOOLS if t in result["tools"]]
    key = memory_key(result["tools"][tools[0]])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        vals = [(result["tools"][tool]["phases"].get(ph, {}).get(key) or 0) / MiB for ph in PHASES]
        xs = [j + (i - (len(tools) - 1) / 2) * width for j in range(len(PHASES))]
        bars = ax.bar(xs, vals, width, label=LABELS[tool])
        ax.bar_label(bars, fmt="%.0f" if max(vals, default=0) >= 100 else "%.2f", fontsize=7)
    ax.set_xticks(range(len(PHASES)), PHASES)
    ax.set_ylabel(_mem_label(result))
    ax.set_title(f"{result['model']['config']}: peak memory by phase ({result['environment']['device']})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_seq(result: dict[str, Any], path: Path) -> Path:
    """Memory (CUDA: peak allocated; CPU: bytes saved for backward) against the sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    metric = ""
    for tool in TOOLS:
        t = result["tools"].get(tool)
        if not t or not t.get("seq_sweep"):
            continue
        rows = t["seq_sweep"]
        metric = rows[0]["metric"]
        xs = [r["seq_len"] for r in rows]
        meas = [r["measured_bytes"] / MiB if r["measured_bytes"] is not None else float("nan") for r in rows]
        est = [r["estimated_bytes"] / MiB for r in rows]
        line, = ax.plot(xs, meas, marker="o", label=f"{LABELS[tool]} measured")
        ax.plot(xs, est, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{LABELS[tool]} estimate")
    ax.set_xlabel("sequence length (tokens per sequence)")
    ax.set_ylabel(f"{metric}, MiB")
    ax.set_title(f"{result['model']['config']}: {metric}, batch {result['settings']['batch']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, memory_by_phase.png and memory_vs_seq.png into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "md": out / "report.md",
        "phases_png": out / "memory_by_phase.png",
        "seq_png": out / "memory_vs_seq.png",
    }
    plot_phases(result, paths["phases_png"])
    plot_seq(result, paths["seq_png"])
    result = dict(result)
    result["files"] = {k: p.name for k, p in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    return paths
