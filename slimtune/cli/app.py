"""Shared pieces of the `slimtune` command: the typer app, consoles, the error guard, the progress reporter.

Every user error is a `SlimtuneError`: printed as one line `error: ...` on stderr with its exit code (2 for bad
input, 3 for out of memory, 4 for a non-finite loss); never a traceback. Command modules beside this one register
their commands on `app`; `slimtune/cli/__init__.py` imports them all.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TextColumn

from slimtune.errors import SlimtuneError

app = typer.Typer(
    name="slimtune",
    help="Memory-efficient single-GPU fine-tuning on 4-bit bases (QLoRA, rsLoRA, DoRA, LaMDA, IntTune, LayRA, LoRAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_group(name: str, help: str) -> typer.Typer:
    """A group of subcommands (`slimtune <name> ...`) with the app's settings, registered on `app`."""
    group = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False, rich_markup_mode=None)
    app.add_typer(group, name=name)
    return group
console = Console()
err_console = Console(stderr=True)
# Exit code of a run stopped by SIGINT/SIGTERM after saving its checkpoint (128 + SIGINT, as shells report Ctrl-C).
INTERRUPTED_EXIT = 130
def _recipes_dir() -> Path:
    """The shipped recipes: slimtune/recipes in an installed wheel, else recipes/ of the checkout."""
    installed = Path(__file__).resolve().parent.parent / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see `slimtune recipes`).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=1e-4 (repeatable).")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Smoke mode: SmolLM2-135M, local UDHR data, a few steps, small "
                                        "eval, outputs under --smoke-dir (see README, Language recipes).")]
SmokeDirOpt = Annotated[Path, typer.Option("--smoke-dir", help="Root folder of smoke runs and their generated data.")]


def _version(value: bool) -> None:
    if value:
        import torch

        from slimtune import __version__

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        console.print(f"slimtune {__version__} (torch {torch.__version__}, {cuda})", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Memory-efficient single-GPU fine-tuning on 4-bit bases (QLoRA, rsLoRA, DoRA, LaMDA, IntTune, LayRA, LoRAM)."""


def guarded(fn):
    """Turn SlimtuneError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimtuneError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(width: int, *, step: int, total: int, elapsed: float, eta: float | None, loss: float | None = None,
                  lr: float | None = None, tps: float | None = None, peak: int | None = None,
                  skipped: bool = False) -> str:
    """One progress line that fits `width` columns: whole fields only, the least useful dropped first.

    Priority: step/total, loss, eta, tok/s, elapsed, lr, peak memory; the bar takes what is left (if ≥ 8 columns).
    A figure is never cut: a field either appears whole or not at all.
    """
    fields: list[tuple[int, str]] = [(0, f"{step}/{total}")]  # (priority, text); the order below is display order
    if loss is not None:
        fields.append((1, f"loss {loss:.4f}"))
    if lr is not None:
        fields.append((5, f"lr {lr:.2e}"))
    if tps is not None:
        fields.append((3, f"{tps:,.0f} tok/s"))
    if peak is not None:
        fields.append((6, f"peak {_human(peak)}"))
    if skipped:
        fields.append((1, "skipped"))
    fields.append((4, _clock(elapsed)))
    fields.append((2, f"eta {_clock(eta)}"))
    sep = "  "
    keep = sorted(range(len(fields)), key=lambda i: fields[i][0])
    while keep and len(sep.join(fields[i][1] for i in sorted(keep))) > width:
        keep.pop()
    text = sep.join(fields[i][1] for i in sorted(keep))
    room = width - len(text) - 2 - len(sep)
    if room >= 8 and total > 0:
        filled = round(room * min(step / total, 1.0))
        text = "[" + "#" * filled + "-" * (room - filled) + "]" + sep + text
    return text


class RichReporter:
    """Live progress on one line (step, loss, eta, tok/s, elapsed, lr, peak memory), fitted to the terminal
    width at every update; messages print above it."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self._t0 = 0.0
        self._done0 = 0
        self._last: dict[str, Any] = {}

    def log(self, message: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else console).print(f"[dim]·[/] {escape(message)}",
                                                                         highlight=False)

    def warn(self, message: str) -> None:
        (self.progress.console if self.progress else err_console).print(f"[yellow]warning:[/] {escape(message)}",
                                                                         highlight=False)

    def _line(self, step: int) -> str:
        import time

        elapsed = time.perf_counter() - self._t0
        rate = (step - self._done0) / elapsed if elapsed > 0 and step > self._done0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else None
        width = max(console.width - 1, 20)  # read at every update: follows a resized terminal
        return progress_line(width, step=step, total=self.total, elapsed=elapsed, eta=eta, **self._last)

    def start(self, *, total: int, done: int) -> None:
        import time

        self.total, self._done0, self._t0, self._last = total, done, time.perf_counter(), {}
        self.progress = Progress(TextColumn("{task.fields[line]}", markup=False), console=console,
                                 disable=self.quiet, auto_refresh=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, line=self._line(done))
        self.progress.refresh()

    def step(self, result: Any, peak_memory_bytes: int) -> None:
        tps = result.tokens / result.seconds if result.seconds > 0 else 0.0
        self._last = {"loss": result.loss, "lr": result.lr, "tps": tps, "peak": peak_memory_bytes,
                      "skipped": bool(result.skipped)}
        if self.progress is not None:
            self.progress.update(self.task, completed=result.step, line=self._line(result.step))
            self.progress.refresh()

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
