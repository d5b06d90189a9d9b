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
# Exit code of a run stopped by SIGINT/SIGTERM after saving its checkpoint (128 + SIGINT, as shells report Ctrl-C).
INTERRUPTED_EXIT = 130

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see `slimtune recipes`).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=1e-4 (repeatable).")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Smoke mode: SmolLM2-135M, local UDHR data, a few steps, small "
                                        "eval, outputs under --smoke-dir (see README, Language recipes).")]
SmokeDirOpt = Annotated[Path, typer.Option("--smoke-dir", help="Root folder of smoke runs and their generated data.")]


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


def _load(recipe: Path, overrides: list[str] | None, smoke: bool = False, smoke_dir: Path | None = None,
          show_plan: bool = False):
    from slimtune.config.recipe import load_recipe

    if not smoke:
        return load_recipe(recipe, overrides)
    from slimtune.smoke import SMOKE_ROOT, load_smoke_recipe

    r, plan = load_smoke_recipe(recipe, overrides, root=smoke_dir or Path(SMOKE_ROOT))
    if show_plan:
        console.print("smoke mode = these overrides:", highlight=False)
        for item in plan.overrides:
            console.print(f"  --set '{item}'", highlight=False, markup=False, soft_wrap=True)
    for note in plan.notes:
        err_console.print(f"[yellow]smoke:[/] {note}", highlight=False)
    return r


# --------------------------------------------------------------------------------------------- commands


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


loram_app = typer.Typer(
    name="loram",
    help="LoRAM steps on their own: prune a base, recover an adapter trained on the pruned model. A recipe with a "
    "`loram:` section runs the whole pipeline with `slimtune run`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(loram_app, name="loram")


def _print_loram_summary(info: dict) -> None:
    from slimtune.loram.pipeline import describe_reduction

    console.print(f"LoRAM: {describe_reduction(info['prune']['reduction'])}", highlight=False)
    ev = info.get("eval") or {}
    before, after = (ev.get("original") or {}).get("heldout"), (ev.get("merged") or {}).get("heldout")
    if before and after:
        console.print(f"LoRAM: held-out loss of the original model {before['loss']:.4f} → {after['loss']:.4f} with "
                      f"the recovered adapter ({before['tokens']} tokens)", highlight=False)
    for key in ("recovered", "merged"):
        if info.get(key):
            console.print(f"LoRAM {key}: {info[key]}", highlight=False)


@loram_app.command("prune")
@guarded
def loram_prune(
    model: Annotated[str, typer.Option("--model", "-m", help="Base: hub id, local HF folder, .gguf or pkg: path.",
                                       show_default=False)],
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of KV-head groups and MLP neurons removed "
                                         "per pruned layer, in [0, 1).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned model.", show_default=False)],
    method: Annotated[str, typer.Option("--method", help="magnitude | random")] = "magnitude",
    keep_first: Annotated[int, typer.Option("--keep-first", help="Leading layers left intact.")] = 0,
    keep_last: Annotated[int, typer.Option("--keep-last", help="Trailing layers left intact.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --method random.")] = 0,
) -> None:
    """Prune a base model (structured: KV-head groups and MLP neurons) into a folder that `slimtune run` and the
    model loader accept as a base (config.json + pruned safetensors + loram.json + tokenizer)."""
    from types import SimpleNamespace

    from slimtune.loram.pipeline import describe_reduction, prune_to_folder
    from slimtune.models.load import ModelConfig

    if not 0.0 <= ratio < 1.0:
        raise SlimtuneError(f"--ratio {ratio}: must be in [0, 1)")
    if method not in ("magnitude", "random"):
        raise SlimtuneError(f"--method {method}: choose magnitude or random")
    if keep_first < 0 or keep_last < 0:
        raise SlimtuneError("--keep-first/--keep-last: must be >= 0")
    settings = SimpleNamespace(ratio=ratio, method=method, keep_first=keep_first, keep_last=keep_last, seed=seed)
    summary = prune_to_folder(ModelConfig(name=model), settings, out, reporter=RichReporter())
    console.print(f"[green]pruned[/] {len(summary['pruned_layers'])} layers of {model} into {out}: "
                  f"{describe_reduction(summary['reduction'])}", highlight=False)


@loram_app.command("recover")
@guarded
def loram_recover(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="PEFT adapter trained on the pruned model (or a "
                                          "run folder holding adapter/ or train/adapter/).", show_default=False)],
    pruned: Annotated[Path, typer.Option("--pruned", "-p", help="The pruned model folder (or its loram.json).",
                                         show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the recovered PEFT adapter.",
                                      show_default=False)],
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="base_model_name_or_path to record "
                                                      "(default: the original model in loram.json).")] = None,
) -> None:
    """Expand an adapter trained on a pruned model to the original model's shapes (zero rows/columns at pruned
    positions); the result is a PEFT adapter for the ORIGINAL model."""
    from slimtune.loram.recover import recover_adapter

    peft_dir = next((d for d in (adapter, adapter / "adapter", adapter / "train" / "adapter")
                     if (d / "adapter_config.json").is_file()), adapter)
    path = recover_adapter(peft_dir, pruned, out, base_model_name_or_path=base_model)
    console.print(f"[green]recovered[/] adapter for the original model written to {path}", highlight=False)


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


@app.command("estimate")
@guarded
def estimate_cmd(
    recipe: RecipeArg,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", help="GPU memory (GiB) to check the fit against.")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as JSON instead of a table.")] = False,
    set_: SetOpt = None,
) -> None:
    """Peak GPU memory of a recipe's training step, component by component, from the model config alone (no
    weights, no GPU). Multi-stage recipes: every stage is estimated and the largest is shown."""
    from slimtune.bench.estimate import GiB, estimate_recipe_stages, format_table, to_json

    if not gpu_mem > 0:
        raise SlimtuneError(f"--gpu-mem {gpu_mem}: expected a positive number of GiB")
    r = _load(recipe, set_)
    stages = estimate_recipe_stages(r, gpu_mem)
    name, worst = max(stages, key=lambda s: s[1].total_bytes)
    if as_json:
        data = {"recipe": str(recipe), "stage": name, **to_json(worst),
                "stages": [{"stage": n, "total_bytes": e.total_bytes, "total_gib": round(e.total_bytes / GiB, 4),
                            "fits": e.fits(), "max_seq_len": e.max_seq_len_that_fits()} for n, e in stages]}
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
) -> None:
    """Train N steps with slimtune and with HF + PEFT + bitsandbytes on the same random model and data; write a
    report (JSON, Markdown, PNG) of memory per phase, tokens/s, saved activations and the estimate's gap."""
    import datetime

    from slimtune.bench.report import write_report
    from slimtune.bench.runner import BenchConfig, run_bench

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
    log = (lambda _m: None) if quiet else (lambda m: console.print(f"[dim]·[/] {m}", highlight=False))
    result = run_bench(cfg, log=log)
    if out is None:
        stem = Path(model_config).stem if ("/" in model_config or "." in model_config) else model_config
        out = Path("bench/results") / (f"{result['environment']['device'].split(':')[0]}-{stem}-"
                                       f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    paths = write_report(result, out)
    _print_bench(result)
    console.print(f"report: {', '.join(str(p) for p in paths.values())}", highlight=False)


def _print_bench(result: dict) -> None:
    from slimtune.bench.runner import PHASES, memory_key

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


def _resume_value(argv: list[str]) -> list[str]:
    """`--resume` without a value means the latest checkpoint. Typer options cannot have an optional value, so
    insert `latest` when the next word is missing, another option, or the recipe file."""
    out = list(argv)
    for i, word in enumerate(out):
        if word == "--":
            break
        if word == "--resume":
            nxt = out[i + 1] if i + 1 < len(out) else None
            if nxt is None or nxt.startswith("-") or nxt.endswith((".yaml", ".yml")):
                out.insert(i + 1, "latest")
            break
    return out


def _quiet_third_party() -> None:
    """The CLI shows its own progress: silence transformers' loading bars and info, and bitsandbytes' CPU notice
    that an optional `kernels` hub package is absent (it is not needed)."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    _quiet_third_party()
    sys.argv[1:] = _resume_value(sys.argv[1:])
    try:
        app()
    except SlimtuneError as e:  # pragma: no cover - commands are guarded; this is a last line of defence
        err_console.print(f"error: {e}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
