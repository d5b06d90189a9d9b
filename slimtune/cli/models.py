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
) -> None:
    """Merge a trained adapter into its base and write a full model (safetensors + config + tokenizer)."""
    from slimtune.models.load import DTYPES, ModelConfig
    from slimtune.train.merge import merge_to_folder

    native, base = _adapter_and_model(adapter, model)
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    path = merge_to_folder(ModelConfig(name=base), native, out, dtype=dtype)
    console.print(f"[green]merged[/] model written to {path}", highlight=False)


@app.command()
@guarded
def export(
    adapter: Annotated[Path, typer.Argument(help="A run's adapter_native/ folder (or a run folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the PEFT adapter.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: the run's recipe model).")] = None,
) -> None:
    """Export a trained adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    from slimtune.adapters.export import export_peft, load_native
    from slimtune.models.load import ModelConfig, QuantConfig, load_model

    native, base = _adapter_and_model(adapter, model)
    loaded = load_model(ModelConfig(name=base), QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
    load_native(loaded.model, native)
    path = export_peft(loaded.model, out, base_model_name_or_path=base)
    console.print(f"[green]exported[/] PEFT adapter to {path}", highlight=False)


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
