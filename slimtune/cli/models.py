"""`merge`, `export`, `adapters`, `arithmetic`, `doctor`: what to do with a trained adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slimtune.cli.app import app, console, guarded
from slimtune.errors import SlimtuneError


@app.command()
@guarded
def merge(
    adapter: Annotated[Path, typer.Argument(help="A run's adapter_native/ folder (or a run folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged model.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: the run's recipe model).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16 | float16 | float32")] = "bfloat16",
    onto: Annotated[str, typer.Option("--onto", help="original: the base as stored | dequantized: the NF4-"
                                      "dequantized weights the adapter was trained against.")] = "original",
) -> None:
    """Merge a trained adapter into its base and write a full model (safetensors + config + tokenizer)."""
    from slimtune.export.merge import merge_to_folder
    from slimtune.models.load import ModelConfig

    native, base = _adapter_and_model(adapter, model)
    path = merge_to_folder(ModelConfig(name=base), native, out, dtype=dtype, onto=onto)
    console.print(f"[green]merged[/] model (onto the {onto} base) written to {path}", highlight=False)


FORMATS = ("peft", "gguf", "gguf-lora")


@app.command()
@guarded
def export(
    adapter: Annotated[Path, typer.Argument(help="A run folder, its adapter_native/ or a PEFT adapter folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/<format>/).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: the run's recipe model).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="peft | gguf (merged model, llama.cpp/Ollama) | "
                                     "gguf-lora (the adapter alone, llama.cpp LoRA GGUF).")] = "peft",
    quant: Annotated[str, typer.Option("--quant", "-q", help="--format gguf: Q4_K_M | Q5_K_M | Q6_K | Q8_0 | Q4_0 "
                                       "| F16 | BF16")] = "Q4_K_M",
    onto: Annotated[str, typer.Option("--onto", help="--format gguf: merge into the original base or the "
                                      "NF4-dequantized one the adapter was trained on.")] = "original",
    name: Annotated[Optional[str], typer.Option("--name", help="Model name for Ollama (default: the run folder's "
                                                "name).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="--format peft: export at this rank b (adapters with "
                                                "nested ranks: dylora; default: the trained rank).")] = None,
) -> None:
    """Export a trained adapter: PEFT format, a merged GGUF (+ Ollama Modelfile), or a llama.cpp LoRA GGUF."""
    if fmt not in FORMATS:
        raise SlimtuneError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if rank is not None and fmt != "peft":
        raise SlimtuneError(f"--rank {rank}: only with --format peft (export the rank-{rank} PEFT adapter first)")
    root = adapter.parent if adapter.name in ("adapter_native", "adapter") else adapter
    out = out or root / fmt.replace("-", "_")
    if fmt == "peft":
        path = _peft_folder(adapter, model, out, rank=rank)
        console.print(f"[green]exported[/] PEFT adapter to {path}", highlight=False)
        return
    from slimtune.export.mixes import FILE_TYPES

    if fmt == "gguf" and quant not in FILE_TYPES:  # before any loading
        raise SlimtuneError(f"--quant {quant}: choose one of {', '.join(FILE_TYPES)}")
    peft_dir, base = _peft_for(adapter, model)
    _export_gguf_files(peft_dir, base, out, fmt=fmt, quant=quant, onto=onto, name=name or root.resolve().name)


def _export_gguf_files(peft_dir: Path, base: str, out: Path, *, fmt: str, quant: str, onto: str, name: str) -> None:
    """The GGUF exports behind `slimtune export --format gguf|gguf-lora`, with a progress bar and a summary."""
    from rich.progress import Progress

    from slimtune.export.run import export_adapter_gguf

    if fmt == "gguf-lora":
        files = export_adapter_gguf(peft_dir, base, out, name=name, quant=None, lora=True)
        console.print(f"[green]wrote[/] llama.cpp LoRA GGUF {files.lora} (base: {base})", highlight=False)
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"GGUF {quant}", total=None)
        files = export_adapter_gguf(peft_dir, base, out, name=name, quant=quant, onto=onto,
                                    progress=lambda msg: bar.update(task, advance=1, description=f"GGUF {quant}: {msg}"))
    res = files.gguf
    types = ", ".join(f"{k}×{v}" for k, v in sorted(res.types.items()))
    console.print(f"[green]wrote[/] {res.path} ({res.path.stat().st_size / 2**20:.1f} MiB; {types}; merged onto the "
                  f"{onto} base {base}; {res.seconds:.1f} s) and {files.modelfile.name}", highlight=False)
    console.print(f"Ollama: {files.ollama}", highlight=False, markup=False, soft_wrap=True)


def _peft_folder(adapter: Path, model: str | None, out: Path, *, rank: int | None = None) -> Path:
    """The PEFT export of `slimtune export --format peft`: the same folder a run writes (a base PEFT loads by name,
    the tokenizer with the chat template the run trained with, the original base spec in slimtune.json); ``rank``:
    every adapter exported at that rank (``Adapter.select_rank``: DyLoRA)."""
    from slimtune.adapters.export import export_peft, load_native
    from slimtune.export.merge import trained_chat_template
    from slimtune.models.load import ModelConfig, QuantConfig, load_model, peft_base_name

    native, base = _adapter_and_model(adapter, model)
    loaded = load_model(ModelConfig(name=base), QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
    adapters = load_native(loaded.model, native)
    if rank is not None:
        try:
            for a in adapters.values():
                a.select_rank(rank)
        except ValueError as e:
            raise SlimtuneError(str(e)) from None
    template = trained_chat_template(native)
    if template is not None:
        loaded.tokenizer.chat_template = template
    return export_peft(loaded.model, out, base_model_name_or_path=peft_base_name(base), tokenizer=loaded.tokenizer,
                       metadata={"base_model": base})


def _peft_for(adapter: Path, model: str | None) -> tuple[Path, str]:
    """A PEFT folder for ``adapter`` (the run's adapter/, or one exported now from adapter_native/) and the base."""
    from slimtune.adapters.export import PEFT_CONFIG

    for cand in (adapter, adapter / "adapter"):
        if (cand / PEFT_CONFIG).is_file():
            meta = cand / "slimtune.json"
            base = model or (json.loads(meta.read_text()).get("base_model") if meta.is_file() else None) \
                or json.loads((cand / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
            if not base:
                raise SlimtuneError(f"{adapter}: base model unknown; pass --model")
            return cand, base
    native, base = _adapter_and_model(adapter, model)
    return _peft_folder(adapter, model, native.parent / "adapter"), base


@app.command()
@guarded
def adapters(
    model_config: Annotated[str, typer.Option("--model-config", help="Built-in name (e.g. Llama-2-7b-hf), hub id in "
                                              "the local cache, config.json, model folder or .gguf.")] = "Llama-2-7b-hf",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Rank r for every kind.")] = 16,
    targets: Annotated[str, typer.Option("--targets", help="all-linear or comma-separated module names.")] = "all-linear",
) -> None:
    """List every adapter kind with its trainable parameter count on a model config (built on the meta device)."""
    from slimtune.adapters.base import registry
    from slimtune.adapters.counts import trainable_counts
    from slimtune.bench.configs import resolve_model_config

    if rank <= 0:
        raise SlimtuneError(f"--rank {rank}: must be > 0")
    cfg = resolve_model_config(model_config)
    tg: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    table = Table(title=f"trainable parameters at r={rank} on {model_config} ({tg if isinstance(tg, str) else ','.join(tg)})")
    for col in ("kind", "trainable at start", "trainable at end", "description"):
        table.add_column(col, overflow="fold")
    for kind, cls in registry().items():
        try:
            start = trainable_counts(cfg, kind, rank, tg)
            end = trainable_counts(cfg, kind, rank, tg, at_end=True)
        except ValueError as e:
            raise SlimtuneError(f"--targets {targets}: {e}") from None
        table.add_row(kind, f"{start:,}", f"{end:,}", cls.description)
    console.print(table)


@app.command()
@guarded
def arithmetic(
    base: Annotated[Path, typer.Option("--base", help="Base model folder (θ_base).")],
    adapter: Annotated[Path, typer.Option("--adapter", help="Trained adapter (native or PEFT folder) on the base.")],
    instruct: Annotated[Path, typer.Option("--instruct", help="Instruct model folder (θ_instruct) of the same shape.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    lam: Annotated[float, typer.Option("--lambda", help="Weight λ of the task vector (θ_instruct − θ_base).")] = 1.0,
) -> None:
    """Model arithmetic (LayRA): θ = θ_base + Δ_adapter + λ·(θ_instruct − θ_base), written as a full model."""
    from slimtune.adapters.arithmetic import arithmetic_merge

    for flag, p in (("--base", base), ("--adapter", adapter), ("--instruct", instruct)):
        if not p.is_dir():
            raise SlimtuneError(f"{flag} {p}: no such folder")
    path = arithmetic_merge(base, adapter, instruct, lam, out)
    console.print(f"[green]merged[/] θ_base + Δ + {lam}·(θ_instruct − θ_base) into {path}", highlight=False)


def _adapter_and_model(adapter: Path, model: str | None) -> tuple[Path, str]:
    """Resolve an adapter folder (native) and its base model name from the run's saved recipe."""
    from slimtune.adapters.export import NATIVE_CONFIG

    native = adapter / "adapter_native" if (adapter / "adapter_native").is_dir() else adapter
    if not (native / NATIVE_CONFIG).is_file():
        raise SlimtuneError(f"{adapter}: not a slimtune adapter folder (no {NATIVE_CONFIG})")
    if model is None:
        model = json.loads((native / NATIVE_CONFIG).read_text()).get("base_model")
    if not model:
        raise SlimtuneError(f"{adapter}: base model unknown; pass --model")
    return native, model


@app.command()
@guarded
def doctor() -> None:
    """Show versions, the GPU, whether the fused kernels can run, and what is missing."""
    from slimtune.doctor import diagnose

    report = diagnose()
    table = Table(title="slimtune doctor")
    table.add_column("check")
    table.add_column("value", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, c.value if c.ok else f"[yellow]{c.value}[/]")
    console.print(table)
    if report.missing:
        console.print("[bold]missing:[/]", highlight=False)
        for line in report.missing:
            console.print(f"  - {line}", highlight=False, markup=False)
    else:
        console.print("[green]nothing missing[/]", highlight=False)


# --------------------------------------------------------------------------------------------- loram
