"""`study`: every adapter kind on one task, a small lr sweep each (slimtune.bench.study)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from slimtune.cli.app import RecipeArg, SetOpt, _load, app, console, guarded
from slimtune.errors import SlimtuneError


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SlimtuneError(f"{what} {text!r}: expected comma-separated numbers, e.g. 5e-4,2e-3") from None
    if not vals or any(not v > 0 for v in vals):
        raise SlimtuneError(f"{what} {text!r}: expected positive numbers")
    return vals


@app.command("study")
@guarded
def study_cmd(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for study.json, study.md and study.png.")] = Path(
        "bench/results/study"),
    kinds: Annotated[Optional[str], typer.Option("--kinds", help="Comma list of arms to run (default: all): "
                                                 "lora,rslora,dora,lamda,lamda_pp,slora,nlora,inttune,layra,full",
                                                 show_default=False)] = None,
    lrs: Annotated[Optional[str], typer.Option("--lrs", help="Comma list of learning rates for every arm (default: "
                                               "each arm's own grid).", show_default=False)] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Where the runs' folders go (default: a "
                                                     "temporary folder).", show_default=False)] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Skip the plot.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train every adapter kind on the recipe's task (same base, data, steps, eval) at a few learning rates each;
    report trainable parameters, optimizer state, bytes saved for backward per token, step time and the recipe's
    first metric at each kind's best lr."""
    from dataclasses import replace

    from slimtune.bench.study import DEMO_ARMS, render_markdown, run_study, write_results

    r = _load(recipe, set_)
    arms = list(DEMO_ARMS)
    if kinds:
        wanted = [k.strip() for k in kinds.split(",") if k.strip()]
        known = {a.name for a in arms}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            raise SlimtuneError(f"--kinds: unknown arm {unknown[0]!r}; known: {', '.join(sorted(known))}")
        arms = [a for a in arms if a.name in wanted]
    if lrs:
        grid = _floats(lrs, "--lrs")
        arms = [replace(a, lrs=grid) for a in arms]
    with tempfile.TemporaryDirectory(prefix="slimtune-study-") as tmp:
        study = run_study(r, arms, base_dir=recipe.parent, work_dir=work_dir or Path(tmp),
                          progress=lambda line: console.print(line, highlight=False, markup=False),
                          on_run=lambda partial: write_results(partial, out, png=False))  # kept if stopped
    paths = write_results(study, out, png=not no_png)
    console.print(render_markdown(study), highlight=False, markup=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
