"""`run`, `validate`, `recipes`: recipes in, runs out."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from slimtune.cli.app import (INTERRUPTED_EXIT, RECIPES_DIR, RecipeArg, RichReporter, SetOpt, SmokeDirOpt, SmokeOpt,
                              _human, _load, _print_loram_summary, app, console, guarded)
from slimtune.errors import SlimtuneError
from slimtune.train.runlock import LOCK_NAME, RunLock


@app.command()
@guarded
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from the latest checkpoint (--resume alone, or 'latest'), or from the given "
        "checkpoint folder or run folder.", show_default=False)] = None,
    restart: Annotated[bool, typer.Option(
        "--restart", help="Start the run over: the old run folder is moved aside to <dir>.old-<time> (never "
        "deleted).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
    smoke: SmokeOpt = False,
    smoke_dir: SmokeDirOpt = Path("runs/smoke"),
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", min=1, help="Data-parallel on N local GPUs (or N CPU processes): re-runs this command under "
        "`torchrun --standalone --nproc-per-node N -m slimtune`. train.distributed: ddp (the whole base on every "
        "rank) or fsdp (the base sharded over the ranks). Several nodes: call torchrun yourself.",
        show_default=False)] = None,
) -> None:
    """Run a recipe: every stage (train, export, merge, evaluate) not yet done."""
    from slimtune.models.load import resolve_device
    from slimtune.train import distributed
    from slimtune.train.loggers import check_available

    r = _load(recipe, set_, smoke, smoke_dir)
    resolve_device(r.train.device)  # a CUDA request on a CPU-only torch: one line now, not after the model load
    for _, sr in r.resolved_stages():
        check_available(sr.train.report_to)  # a logger's missing library: one line before the model loads
    _check_data(r, recipe.parent, skip_lenient=True)  # a wrong format or field: file:line before the model loads
    if nproc is not None and nproc > 1 and not distributed.launched_by_torchrun():  # checked once, then N processes
        os.execv(sys.executable, distributed.torchrun_argv(nproc, sys.argv[1:]))
    device = resolve_device(r.train.device)
    distributed.init_from_env(device)  # torchrun: join the process group (NCCL on CUDA, gloo on the CPU)
    if restart and resume is not None:
        raise SlimtuneError("--restart and --resume: give one of them")
    res: bool | Path = False if resume is None else (True if resume in ("", "latest") else Path(resume))
    if isinstance(res, Path) and not res.is_dir():
        raise SlimtuneError(f"--resume {resume}: no such checkpoint folder")
    command = _command_line(recipe, set_, smoke, smoke_dir)
    run_dir = r.run_dir()
    main = distributed.is_main()  # torchrun: rank 0 alone writes and prints
    lock = RunLock(run_dir).acquire() if main else None  # one run per folder: a second one is one line, exit 2
    try:
        _run_locked(r, recipe, run_dir, res, restart, quiet, command, lock)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(r, recipe: Path, run_dir: Path, res: bool | Path, restart: bool, quiet: bool, command: str,
                lock: RunLock | None) -> None:
    """``run`` once this process holds the run folder (rank 0) or is a torchrun peer (``lock`` None)."""
    from slimtune.bench.hints import EstimateOnOOM
    from slimtune.loram.pipeline import run_loram
    from slimtune.models.load import resolve_device
    from slimtune.train import distributed, faults
    from slimtune.train.runner import run_recipe

    main = lock is not None
    if restart and main:
        moved = move_aside(run_dir)
        if moved is not None:
            lock.release()  # the lock file moved with the old folder: take the new folder's
            lock.run_dir = run_dir
            lock.acquire()
            console.print(f"--restart: the previous run is kept in {moved}", highlight=False)
    elif not res:
        _check_unchanged(r, run_dir, command)
    if not res and main:  # a resume records its recipe once the checkpoint accepted it (below)
        _record_run(r, run_dir, command)
    distributed.barrier()  # the others look at the run folder once rank 0 has moved it aside / recorded the run
    callbacks = [EstimateOnOOM(), *faults.from_env()]  # SLIMTUNE_FAULT: the crash tests' faults, read once here
    runner = run_loram if r.loram is not None else run_recipe  # LoRAM: prune → align → train → recover → merge
    device = resolve_device(r.train.device)
    with distributed.session(device, callbacks):  # a failed collective: one line (exit 5); a clean end leaves
        result = runner(r, base_dir=recipe.parent, reporter=RichReporter(quiet or not main), resume=res,
                        callbacks=callbacks)
    if res and main:
        _record_run(r, run_dir, command)
    if main:
        _print_run_summary(result, command)
    code = INTERRUPTED_EXIT if result.get("interrupted") else 0  # stopped by SIGINT/SIGTERM after saving: not 0
    if distributed.left_alone():  # a peer never left the group: the interpreter's teardown could wait on it forever
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise typer.Exit(code)


def _check_data(r, base_dir: Path, *, skip_lenient: bool = False) -> list[dict]:
    """Check the first records of every local source against its format (no model); file:line errors."""
    from slimtune.data.validate import check_sources

    datas = [("data", r.data)] + [(f"stages.{i}.data", st.data) for i, st in enumerate(r.stages)]
    if r.loram is not None and r.loram.align is not None:
        datas.append(("loram.align.data", r.loram.align.data))
    return [row for key, d in datas if d is not None and not (skip_lenient and d.on_error == "skip")
            for row in check_sources(d, base_dir, where=key)]


def _command_line(recipe: Path, set_: list[str] | None, smoke: bool, smoke_dir: Path) -> str:
    """The user's `slimtune run` command, re-quoted: recipe, every --set in order, smoke flags."""
    words = ["slimtune", "run", str(recipe)]
    for item in set_ or []:
        words += ["--set", item]
    if smoke:
        words.append("--smoke")
        if smoke_dir != Path("runs/smoke"):
            words += ["--smoke-dir", str(smoke_dir)]
    return shlex.join(words)


def move_aside(run_dir: Path) -> Path | None:
    """Rename a run folder to <dir>.old-<YYYYmmdd-HHMMSS>[-N] (nothing is deleted). None if there was none."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(p.name != LOCK_NAME for p in run_dir.iterdir())):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(target)
    return target


RUN_RECIPE = "recipe.json"  # the resolved recipe of the run in this folder (written by `slimtune run`)


def _has_progress(run_dir: Path) -> bool:
    return (run_dir / "run_summary.json").is_file() or any(run_dir.glob("**/stage_summary.json")) or any(
        run_dir.glob("**/checkpoints/step-*"))


def _check_unchanged(r, run_dir: Path, command: str) -> None:
    """A run folder with progress made by other settings: say what changed and how to start over (exit 2)."""
    from slimtune.config.recipe import recipe_changes

    saved = run_dir / RUN_RECIPE
    if not saved.is_file() or not _has_progress(run_dir):
        return
    try:
        old = json.loads(saved.read_text())
    except ValueError:
        return
    changes = recipe_changes(old, r.model_dump(mode="json"))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise SlimtuneError(
            f"{run_dir} holds a run of this recipe with other settings ({shown}). Start it over with: {command} "
            f"--restart (the old folder is moved aside), or give this run another folder (--set output.dir=...)")


def _record_run(r, run_dir: Path, command: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_RECIPE).write_text(json.dumps(r.model_dump(mode="json"), indent=2))
    (run_dir / "command.txt").write_text(command + "\n")


def _print_run_summary(result: dict, command: str) -> None:
    if result.get("interrupted"):
        last = result["stages"][-1]
        console.print(f"[yellow]stopped at step {last['steps']}/{last['total_steps']}[/]; checkpoint saved. "
                      f"Continue with: {escape(command)} --resume", highlight=False, soft_wrap=True)
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
        val = s.get("val") or {}
        if val.get("last"):
            last, best = val["last"], val.get("best") or val["last"]
            console.print(f"{s['stage']}: validation loss {last['val_loss']:.4f} (ppl {last['val_ppl']:.2f}) at step "
                          f"{last['step']}; best {best['val_loss']:.4f} at step {best['step']}"
                          + (f" (adapter in {val['best_adapter']})" if val.get("best_adapter") else ""),
                          highlight=False)
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
    checked = _check_data(r, recipe.parent)
    stages = ", ".join(s.name if s.kind != "train" or not r.stages else
                       f"{s.name} ({sr.adapter.kind} r{sr.adapter.rank})" for s, sr in r.resolved_stages())
    console.print(f"[green]ok[/] {recipe}: {r.adapter.kind} r{r.adapter.rank} on {r.model.name} "
                  f"(quant {r.quant.mode}); stages: {stages}"
                  + (f"; LoRAM: pruned at ratio {r.loram.ratio} ({r.loram.method}, keep first {r.loram.keep_first} / "
                     f"last {r.loram.keep_last}){', aligned' if r.loram.align else ''}" if r.loram else ""),
                  highlight=False)
    local = [c for c in checked if c["checked"]]
    hub = [c["source"] for c in checked if not c["checked"]]
    console.print(f"data: {sum(c['records'] for c in local)} records of {len(local)} local sources checked"
                  + (f"; hub sources read at run time: {', '.join(dict.fromkeys(hub))}" if hub else ""),
                  highlight=False, soft_wrap=True)


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


@app.command("cp")
@guarded
def cp(
    name: Annotated[str, typer.Argument(help="A shipped recipe (see `slimtune recipes`), with or without .yaml.",
                                        show_default=False)],
    dest: Annotated[Optional[str], typer.Argument(help="Target file, or folder (existing, or ending in /); "
                                                  "default: ./NAME.yaml.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a shipped recipe (and the small local data files it names) to edit it."""
    src = RECIPES_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not src.is_file():
        import difflib

        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(Path(name).stem, names, n=1)
        raise SlimtuneError(f"no shipped recipe {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                            + "; `slimtune recipes` lists them")
    target = Path(dest) if dest else Path(src.name)
    if target.is_dir() or (dest or "").endswith(("/", "\\")):
        target = target / src.name
    if target.exists() and not force:
        raise SlimtuneError(f"{target} exists (use --force to overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(src.read_bytes())
    copied = [f"recipe → {target}"]
    for rel in _local_files(src):  # data the recipe names relative to its folder keeps working beside the copy
        out = target.parent / rel
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes((src.parent / rel).read_bytes())
            copied.append(f"{rel} → {out}")
    console.print("copied " + "; ".join(copied), highlight=False, soft_wrap=True)


def _local_files(recipe: Path) -> list[str]:
    """Relative paths of files a recipe mentions that exist beside it (data sources, eval files, ...)."""
    import yaml

    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and not Path(node).is_absolute() and "/" in node and ":" not in node:
            if (recipe.parent / node).is_file() and node not in found:
                found.append(node)

    walk(yaml.safe_load(recipe.read_text()) or {})
    return found
