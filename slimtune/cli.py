"""The `slimtune` command. The only module that prints with rich.

Every user error is a `SlimtuneError`: printed as one line `error: ...` on stderr with its exit code (2 for bad
input, 3 for out of memory, 4 for a non-finite loss); never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from slimtune.errors import SlimtuneError

app = typer.Typer(
    name="slimtune",
    help="Memory-efficient single-GPU fine-tuning on 4-bit bases (QLoRA, rsLoRA, DoRA, LaMDA, IntTune, LayRA, LoRAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see `slimtune recipes`).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=1e-4 (repeatable).")]


def guarded(fn):
    """Turn SlimtuneError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimtuneError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class RichReporter:
    """Live progress: loss, lr, tokens/s, ETA and peak memory."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def log(self, message: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else console).print(f"[dim]·[/] {message}", highlight=False)

    def warn(self, message: str) -> None:
        (self.progress.console if self.progress else err_console).print(f"[yellow]warning:[/] {message}", highlight=False)

    def start(self, *, total: int, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=self.quiet,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def step(self, result: Any, peak_memory_bytes: int) -> None:
        tps = result.tokens / result.seconds if result.seconds > 0 else 0.0
        stats = (f"loss {result.loss:.4f}  lr {result.lr:.2e}  {tps:,.0f} tok/s  peak {_human(peak_memory_bytes)}"
                 + ("  [yellow]skipped[/]" if result.skipped else ""))
        if self.progress is not None:
            self.progress.update(self.task, completed=result.step, stats=stats)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _load(recipe: Path, overrides: list[str] | None):
    from slimtune.config.recipe import load_recipe

    return load_recipe(recipe, overrides)


# --------------------------------------------------------------------------------------------- commands


@app.command()
@guarded
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from the latest checkpoint ('latest') or the given checkpoint folder.",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
) -> None:
    """Run a recipe: every stage (train, export, merge, evaluate) not yet done."""
    from slimtune.train.runner import run_recipe

    r = _load(recipe, set_)
    res: bool | Path = False if resume is None else (True if resume in ("", "latest") else Path(resume))
    if isinstance(res, Path) and not res.is_dir():
        raise SlimtuneError(f"--resume {resume}: no such checkpoint folder")
    result = run_recipe(r, base_dir=recipe.parent, reporter=RichReporter(quiet), resume=res)
    _print_run_summary(result, recipe)


def _print_run_summary(result: dict, recipe: Path) -> None:
    if result.get("interrupted"):
        last = result["stages"][-1]
        console.print(f"[yellow]stopped at step {last['steps']}/{last['total_steps']}[/]; checkpoint saved. "
                      f"Continue with: slimtune run {recipe} --resume", highlight=False)
        return
    table = Table(title=f"run {result['run_dir']}")
    for col in ("stage", "steps", "first loss", "final loss", "tokens/s", "peak memory", "wall"):
        table.add_column(col)
    for s in result["stages"]:
        table.add_row(s["stage"], str(s["steps"]), f"{s['first_loss']:.4f}" if s.get("first_loss") is not None else "-",
                      f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-",
                      f"{s.get('tokens_per_second') or 0:,.0f}", _human(s.get("peak_memory_bytes") or 0),
                      f"{s.get('wall_seconds', 0):.0f} s")
    console.print(table)
    eval_md = Path(result["run_dir"]) / "eval.md"
    if eval_md.is_file():
        console.print(eval_md.read_text(), highlight=False, markup=False)
    console.print(f"outputs in {result['run_dir']}", highlight=False)


@app.command()
@guarded
def validate(recipe: RecipeArg, set_: SetOpt = None,
             show: Annotated[bool, typer.Option("--show", help="Print the full recipe with defaults.")] = False) -> None:
    """Check a recipe (keys, types, values, files) without loading a model."""
    r = _load(recipe, set_)
    if show:
        console.print_json(json.dumps(r.model_dump(mode="json")))
    stages = ", ".join(s.name for s, _ in r.resolved_stages())
    console.print(f"[green]ok[/] {recipe}: {r.adapter.kind} r{r.adapter.rank} on {r.model.name} "
                  f"(quant {r.quant.mode}); stages: {stages}", highlight=False)


@app.command()
@guarded
def recipes(directory: Annotated[Path, typer.Option("--dir", help="Folder of recipes.")] = RECIPES_DIR) -> None:
    """List the shipped recipes with their one-line descriptions."""
    import yaml

    if not directory.is_dir():
        raise SlimtuneError(f"--dir {directory}: no such folder")
    table = Table(title=f"recipes in {directory}")
    for col in ("recipe", "adapter", "model", "description"):
        table.add_column(col, overflow="fold")
    for path in sorted(directory.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        adapter = data.get("adapter", {}) or {}
        table.add_row(path.name, f"{adapter.get('kind', '?')} r{adapter.get('rank', '?')}",
                      str((data.get("model") or {}).get("name", "?")), str(data.get("description", "")))
    console.print(table)


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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SlimtuneError as e:  # pragma: no cover - commands are guarded; this is a last line of defence
        err_console.print(f"error: {e}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
