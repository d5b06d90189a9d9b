"""`eval`, `compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table


from slimtune.cli.app import RecipeArg, SetOpt, SmokeDirOpt, SmokeOpt, app, console, guarded
from slimtune.cli.app import _load


@app.command("eval")
@guarded
def eval_(
    recipe: RecipeArg,
    set_: SetOpt = None,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="A trained adapter: a run or stage folder, or its adapter_native/.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Evaluate this model instead (hub id, folder such as a run's merged/, .gguf).",
        show_default=False)] = None,
    label: Annotated[Optional[str], typer.Option("--label", help="Column name in the report.", show_default=False)] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Use this stage's eval: section.",
                                                 show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default: the run folder).",
                                                show_default=False)] = None,
    smoke: SmokeOpt = False,
    smoke_dir: SmokeDirOpt = Path("runs/smoke"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the report.")] = False,
) -> None:
    """Evaluate a recipe's eval: block on its base model, another model or an adapter; adds a column to eval.json/md."""
    from slimtune.eval.recipe_eval import evaluate_recipe

    r = _load(recipe, set_, smoke, smoke_dir)
    log = (lambda _m: None) if quiet else (lambda m: console.print(f"[dim]·[/] {m}", highlight=False))
    _, (json_path, md_path) = evaluate_recipe(r, base_dir=recipe.parent, model=model, adapter=adapter, label=label,
                                              out_dir=out, stage=stage, log=log)
    console.print(md_path.read_text(), highlight=False, markup=False)
    console.print(f"report: {json_path}, {md_path}", highlight=False)


@app.command()
@guarded
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with an eval.json).", show_default=False)],
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", help="Which evaluation of each run (default: its last one, e.g. 'after sft'); repeatable.",
        show_default=False)] = None,
    all_labels: Annotated[bool, typer.Option("--all", help="Every evaluation of every run.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the table as Markdown (and .json).",
                                                show_default=False)] = None,
) -> None:
    """One table of several runs' evaluations: BLEU/chrF/perplexity per run (e.g. the Sardinian ablations)."""
    from slimtune.eval.compare import compare_runs, lower_is_better, render_markdown

    comp = compare_runs(list(runs), labels=label, all_labels=all_labels)
    table = Table(title="comparison")
    table.add_column("run", no_wrap=True)
    table.add_column("label", no_wrap=True)
    for m in comp.metrics:
        table.add_column(f"{m} {'↓' if lower_is_better(m) else '↑'}", justify="right", overflow="fold")
    for row in comp.rows:
        cells = []
        for m in comp.metrics:
            v = row.metrics.get(m)
            text = "—" if v is None else f"{v:.2f}"
            best = comp.best(m)
            cells.append(f"[bold green]{text}[/]" if len(comp.rows) > 1 and v is not None and v == best else text)
        table.add_row(row.run, row.label, *cells)
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(comp), encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(comp.to_json(), indent=2, ensure_ascii=False) + "\n")
        console.print(f"written: {out}, {out.with_suffix('.json')}", highlight=False)
