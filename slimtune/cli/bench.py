"""`estimate`, `bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slimtune.cli.app import RecipeArg, SetOpt, app, console, guarded
from slimtune.cli.app import _load
from slimtune.errors import SlimtuneError


@app.command("estimate")
@guarded
def estimate_cmd(
    recipe: RecipeArg,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", help="GPU memory (GiB) to check the fit against.")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as JSON instead of a table.")] = False,
    set_: SetOpt = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="GPUs of a data-parallel run (torchrun, `run --nproc`): also show what one rank "
        "holds, by the recipe's train.distributed (--set train.distributed=fsdp). ddp: the full base, the adapter "
        "state and the activations of its own micro_batch on every rank (gradients in DDP's buckets, no second "
        "copy). fsdp: the packed 4-bit base, norms, adapter and optimizer state sharded over the ranks; the quant "
        "state, lm_head and the input embedding replicated; plus two layers all-gathered in flight.")] = 1,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Also show the memory floor: the estimate with every memory switch off, then one more "
        "switch on per row (NF4 lm_head, embeddings in host memory, offload, 8-bit AdamW, bf16 adapters with the "
        "optimizer on the host), with the host memory and the longest context at batch 1.")] = False,
) -> None:
    """Peak GPU memory of a recipe's training step, component by component, from the model config alone (no
    weights, no GPU). Multi-stage recipes: every stage is estimated and the largest is shown. With --nproc N:
    per rank of a DDP or FSDP run (train.distributed) on N GPUs."""
    from slimtune.bench.estimate import GiB, format_table, to_json
    from slimtune.bench.recipe_estimate import estimate_recipe_stages

    if not gpu_mem > 0:
        raise SlimtuneError(f"--gpu-mem {gpu_mem}: expected a positive number of GiB")
    r = _load(recipe, set_)
    stages = estimate_recipe_stages(r, gpu_mem)
    name, worst = max(stages, key=lambda s: s[1].total_bytes)
    accum = {s.name: sr.train.grad_accum for s, sr in r.resolved_stages() if s.kind == "train"}
    global_batch = worst.inputs["micro_batch"] * accum.get(name, r.train.grad_accum) * nproc
    rank = _per_rank(r, name, worst, nproc, accum.get(name, r.train.grad_accum))
    if as_json:
        data = {"recipe": str(recipe), "stage": name, **to_json(worst), "nproc": nproc,
                "per_rank_total_bytes": rank.total_bytes, "global_batch_sequences": global_batch,
                "per_rank": rank.to_json(gpu_mem),
                "stages": [{"stage": n, "total_bytes": e.total_bytes, "total_gib": round(e.total_bytes / GiB, 4),
                            "fits": e.fits(), "max_seq_len": e.max_seq_len_that_fits()} for n, e in stages]}
        if explain:
            from slimtune.bench.floor import explain as floor_ladder

            data["floor"] = [{k: v for k, v in vars(row).items() if k != "estimate"}
                             for row in floor_ladder(worst, gpu_mem)]
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    console.print(format_table(worst))
    if len(stages) > 1:
        table = Table(title=f"{len(stages)} stages (the table above is stage {name}, the largest)")
        for col in ("stage", "seq_len x batch", "total GiB", f"on {gpu_mem:g} GiB", "longest seq_len"):
            table.add_column(col)
        for n, e in stages:
            table.add_row(n, f"{e.inputs['seq_len']} x {e.inputs['micro_batch']}", f"{e.total_bytes / GiB:.3f}",
                          "fits" if e.fits() else "does NOT fit", f"{e.max_seq_len_that_fits():,}")
        console.print(table)
    for note in worst.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if explain:
        from slimtune.bench.floor import explain as floor_ladder
        from slimtune.bench.floor import format_explain

        console.print(format_explain(floor_ladder(worst, gpu_mem), gpu_mem))
    if nproc > 1:
        console.print(_per_rank_table(rank, gpu_mem))
        each, total = rank.total_bytes / GiB, nproc * rank.total_bytes / GiB
        mb, ga = worst.inputs["micro_batch"], accum.get(name, r.train.grad_accum)
        what = ("full base, adapter state and activations on every rank" if rank.mode == "ddp" else
                "sharded base and adapter state, replicated quant state and lm_head, own activations")
        verdict = "fits" if rank.fits(gpu_mem) else "does NOT fit"
        console.print(f"per rank of a{'n FSDP' if rank.mode == 'fsdp' else ' DDP'} run on {nproc} GPUs: {each:.3f} "
                      f"GiB each ({what}; {verdict} on {gpu_mem:g} GiB), {total:.1f} GiB in all; global batch {mb} "
                      f"x {ga} x {nproc} = {global_batch} sequences of {worst.inputs['seq_len']} tokens. NCCL's own "
                      f"communicator buffers are not included.", highlight=False)
        for note in rank.notes:
            console.print(f"[dim]note:[/] {note}", highlight=False)


def _per_rank(r, stage: str, worst, nproc: int, grad_accum: int):
    """The per-rank figures of the stage ``stage`` (its train.distributed and quant.quant_storage)."""
    from slimtune.bench.parallel import per_rank

    resolved = dict((s.name, sr) for s, sr in r.resolved_stages()).get(stage, r)
    return per_rank(worst, nproc, resolved.train.distributed, grad_accum, quant_storage=resolved.quant.quant_storage)


def _per_rank_table(rank, gpu_mem: float) -> Table:
    from slimtune.bench.estimate import GiB
    from slimtune.bench.parallel import LABELS

    table = Table(title=f"per rank: {rank.mode} on {rank.nproc} GPUs (grad_accum {rank.grad_accum})")
    table.add_column("component")
    table.add_column("1 GPU, GiB", justify="right")
    table.add_column(f"per rank ({rank.mode}, {rank.nproc}), GiB", justify="right")
    for key, value in rank.components.items():
        if value or rank.single[key]:
            table.add_row(LABELS[key], f"{rank.single[key] / GiB:.3f}", f"{value / GiB:.3f}")
    table.add_section()
    table.add_row("total (GPU)", f"{rank.single_total_bytes / GiB:.3f}", f"{rank.total_bytes / GiB:.3f}",
                  style="bold")
    table.add_row(f"on {gpu_mem:g} GiB", "", ("fits" if rank.fits(gpu_mem) else "does NOT fit") +
                  f", longest seq_len {rank.max_seq_len_that_fits(gpu_mem):,}")
    return table


@app.command()
@guarded
def bench(
    model_config: Annotated[str, typer.Option(
        "--model-config", help="Built-in config (Llama-3.1-8B, Qwen2.5-0.5B, SmolLM2-135M, ...), a folder, "
        "config.json or GGUF, or 'tiny'. Random weights; nothing is downloaded.")] = "tiny",
    layers: Annotated[Optional[int], typer.Option("--layers", help="Use only this many decoder layers.",
                                                  show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto")] = "auto",
    steps: Annotated[int, typer.Option("--steps", help="Training steps per tool.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps left out of tokens/s.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 256,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per step.")] = 1,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank.")] = 16,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Adapter alpha (default 2 x rank).",
                                                   show_default=False)] = None,
    adapter: Annotated[str, typer.Option("--adapter", help="lora | rslora | dora (PEFT has the same).")] = "lora",
    targets: Annotated[str, typer.Option("--targets", help="all-linear or a comma list (q,k,v,o,gate,up,down).")]
    = "all-linear",
    checkpointing: Annotated[str, typer.Option("--checkpointing", help="slimtune's mode: none | full | offload "
                                               "(the baseline uses HF gradient checkpointing).")] = "full",
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | adamw8bit | paged_adamw8bit")] = "adamw",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32 | "
                                       "float16")] = "auto",
    max_context: Annotated[bool, typer.Option("--max-context", help="CUDA: find the longest sequence that trains "
                                              "under --mem-cap-gib (doubling, then bisection).")] = False,
    mem_cap_gib: Annotated[float, typer.Option("--mem-cap-gib", help="Memory cap for --max-context and the "
                                               "estimate's fit (GiB).")] = 24.0,
    max_context_limit: Annotated[int, typer.Option("--max-context-limit", help="Longest sequence tried.")] = 262_144,
    seq_lens: Annotated[Optional[str], typer.Option("--seq-lens", help="Sweep lengths, e.g. 64,128,256 (default: "
                                                    "seq-len/2, seq-len, 2 x seq-len).", show_default=False)] = None,
    tools: Annotated[str, typer.Option("--tools", help="Which sides to run: slimtune,baseline.")]
    = "slimtune,baseline",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights and tokens.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default bench/results/"
                                                "<device>-<model>-<date>).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final table.")] = False,
    objective: Annotated[str, typer.Option("--objective", help="sft, or dpo: one DPO step of slimtune against TRL's "
                                           "DPOTrainer loss on HF + PEFT + bitsandbytes (--seq-len per sequence, "
                                           "half prompt; --batch pairs); writes <out>/dpo.json")] = "sft",
) -> None:
    """Train N steps with slimtune and with HF + PEFT + bitsandbytes on the same random model and data; write a
    report (JSON, Markdown, PNG) of memory per phase, tokens/s, saved activations and the estimate's gap."""
    import datetime

    from slimtune.bench.report import write_report
    from slimtune.bench.bench_config import BenchConfig
    from slimtune.bench.runner import run_bench

    def ints(text: str | None) -> list[int] | None:
        if text is None:
            return None
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise SlimtuneError(f"--seq-lens {text}: expected comma-separated integers") from None

    cfg = BenchConfig(
        model_config=model_config, layers=layers, device=device, steps=steps, warmup=warmup, seq_len=seq_len,
        batch=batch, rank=rank, alpha=alpha, adapter=adapter, targets=targets, checkpointing=checkpointing,
        optimizer=optimizer, dtype=dtype, max_context=max_context, mem_cap_gib=mem_cap_gib,
        max_context_limit=max_context_limit, seq_lens=ints(seq_lens), seed=seed,
        tools=tuple(t.strip() for t in tools.split(",") if t.strip()),
    )
    if objective != "sft":
        return _bench_preference(objective, model_config, layers, seq_len, batch, rank, steps, seed, checkpointing,
                                 None if device == "auto" else device, out)
    log = (lambda _m: None) if quiet else (lambda m: console.print(f"[dim]·[/] {m}", highlight=False))
    result = run_bench(cfg, log=log)
    if out is None:
        stem = Path(model_config).stem if ("/" in model_config or "." in model_config) else model_config
        out = Path("bench/results") / (f"{result['environment']['device'].split(':')[0]}-{stem}-"
                                       f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    paths = write_report(result, out)
    _print_bench(result)
    console.print(f"report: {', '.join(str(p) for p in paths.values())}", highlight=False)


def _bench_preference(objective, model_config, layers, seq_len, pairs, rank, steps, seed, checkpointing, device,
                      out) -> None:
    """`bench --objective dpo`: slimtune vs TRL DPOTrainer (slimtune.bench.preference); a table and dpo.json."""
    from slimtune.bench.preference import preference_bench

    if objective != "dpo":
        raise SlimtuneError(f"--objective {objective}: the preference bench compares dpo (TRL's DPOTrainer)")
    r = preference_bench(model_config, layers=layers,
                         prompt=seq_len // 2, completion=seq_len - seq_len // 2, pairs=pairs, rank=rank, steps=steps,
                         seed=seed, checkpointing=checkpointing, device=device)
    table = Table(title=f"DPO step, {r['model_config']} ({r['layers']} layers), {pairs} pair(s) of {seq_len} "
                        f"tokens, {r['device']} {r['dtype']}, checkpointing {checkpointing}; TRL {r['trl_version']}")
    for c in ("tool", "saved for backward / pair (MiB)", "bytes / token", "tokens/s", "peak fwd / bwd (MiB)"):
        table.add_column(c, justify="right" if c != "tool" else "left")
    for tool in ("slimtune", "trl"):
        m = r[tool]
        pk = m["peak_bytes"]
        table.add_row(tool, f"{m['saved_bytes_per_pair'] / 2**20:.2f}", f"{m['saved_bytes_per_token']:,.0f}",
                      f"{m['tokens_per_second']:.1f}", "-" if not pk else
                      f"{pk['forward'] / 2**20:.0f} / {pk['backward'] / 2**20:.0f}")
    console.print(table)
    console.print(f"slimtune / TRL saved bytes per pair: {r['saved_ratio']:.3f}", highlight=False)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "dpo.json").write_text(json.dumps(r, indent=2))


def _print_bench(result: dict) -> None:
    from slimtune.bench.bench_config import PHASES, memory_key

    tools = result["tools"]
    key = memory_key(next(iter(tools.values())))
    what = "peak allocated" if key == "allocated_bytes" else "peak RSS above start"
    table = Table(title=f"bench {result['model']['config']} on {result['environment']['device_name']}; memory = "
                        f"{what}, MiB; activation = bytes kept for backward, MiB")
    table.add_column("tool")
    for ph in PHASES:
        table.add_column(ph[:3] if ph != "optimizer" else "opt", justify="right")
    for col in ("tok/s", "B/tok/layer", "act. est", "act. meas", "gap"):
        table.add_column(col, justify="right")
    for name, t in tools.items():
        a = t["activation"]
        gap = a["gap_pct"]
        table.add_row(
            name, *[f"{(t['phases'].get(ph, {}).get(key) or 0) / 2**20:,.1f}" for ph in PHASES],
            "OOM" if t.get("oom") else f"{t.get('tokens_per_second') or 0:,.1f}",
            "-" if t["saved_bytes_per_token_per_layer"] is None else f"{t['saved_bytes_per_token_per_layer']:,.0f}",
            f"{a['estimated']['total'] / 2**20:,.2f}",
            "-" if a["measured"]["total"] is None else f"{a['measured']['total'] / 2**20:,.2f}",
            "-" if gap is None else f"{gap:+.1f}%",
        )
    console.print(table)
    r = result.get("ratios") or {}
    if r:
        parts = [f"{label} {r[k]:.2f}x" for k, label in (
            ("tokens_per_second", "tokens/s"), ("saved_bytes_per_token_per_layer", "saved bytes per token per layer"),
            ("max_context_measured", "max context")) if r.get(k) is not None]
        if parts:
            console.print("slimtune / baseline: " + ", ".join(parts), highlight=False)
