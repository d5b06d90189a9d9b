"""`run`, `validate`, `recipes`: recipes in, runs out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from slimtune.cli.app import (INTERRUPTED_EXIT, RECIPES_DIR, RecipeArg, RichReporter, SetOpt, SmokeDirOpt, SmokeOpt,
                              _human, _load, _print_loram_summary, app, console, guarded)
from slimtune.errors import SlimtuneError


@app.command()
@guarded
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from the latest checkpoint (--resume alone, or 'latest'), or from the given "
        "checkpoint folder or run folder.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
    smoke: SmokeOpt = False,
    smoke_dir: SmokeDirOpt = Path("runs/smoke"),
) -> None:
    """Run a recipe: every stage (train, export, merge, evaluate) not yet done."""
    from slimtune.train.runner import run_recipe

    r = _load(recipe, set_, smoke, smoke_dir)
    res: bool | Path = False if resume is None else (True if resume in ("", "latest") else Path(resume))
    if isinstance(res, Path) and not res.is_dir():
        raise SlimtuneError(f"--resume {resume}: no such checkpoint folder")
    result = run_recipe(r, base_dir=recipe.parent, reporter=RichReporter(quiet), resume=res)
    _print_run_summary(result, recipe)
    if result.get("interrupted"):  # stopped by SIGINT/SIGTERM after saving: not finished, so not exit code 0
        raise typer.Exit(INTERRUPTED_EXIT)


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
    for s in result["stages"]:
        per_source = s.get("tokens_per_source") or {}
        if per_source:
            total = sum(per_source.values()) or 1
            console.print(f"{s['stage']}: tokens per source: " + ", ".join(
                f"{name} {n:,} ({100 * n / total:.1f}%)" for name, n in per_source.items()), highlight=False)
        skipped, bad = s.get("skipped_steps") or [], (s.get("data") or {}).get("skipped_records") or 0
        if skipped:
            console.print(f"[yellow]{s['stage']}: {len(skipped)} steps skipped for a non-finite loss or gradient "
                          f"(train.on_nonfinite: skip): {', '.join(map(str, skipped))}[/]", highlight=False)
        if bad:
            console.print(f"[yellow]{s['stage']}: {bad} malformed data records skipped (data.on_error: skip)[/]",
                          highlight=False)
    if result.get("loram"):
        _print_loram_summary(result["loram"])
    eval_md = Path(result["run_dir"]) / "eval.md"
    if eval_md.is_file():
        console.print(eval_md.read_text(), highlight=False, markup=False)
    console.print(f"outputs in {result['run_dir']}", highlight=False)


@app.command()
@guarded
def validate(recipe: RecipeArg, set_: SetOpt = None,
             show: Annotated[bool, typer.Option("--show", help="Print the full recipe with defaults.")] = False,
             smoke: SmokeOpt = False, smoke_dir: SmokeDirOpt = Path("runs/smoke")) -> None:
    """Check a recipe (keys, types, values, files) without loading a model (--smoke: its smoke version, and the
    overrides that make it)."""
    r = _load(recipe, set_, smoke, smoke_dir, show_plan=smoke)
    if show:
        console.print_json(json.dumps(r.model_dump(mode="json")))
    stages = ", ".join(s.name if s.kind != "train" or not r.stages else
                       f"{s.name} ({sr.adapter.kind} r{sr.adapter.rank})" for s, sr in r.resolved_stages())
    console.print(f"[green]ok[/] {recipe}: {r.adapter.kind} r{r.adapter.rank} on {r.model.name} "
                  f"(quant {r.quant.mode}); stages: {stages}"
                  + (f"; LoRAM: pruned at ratio {r.loram.ratio} ({r.loram.method}, keep first {r.loram.keep_first} / "
                     f"last {r.loram.keep_last}){', aligned' if r.loram.align else ''}" if r.loram else ""),
                  highlight=False)


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
