"""`slimtune kernels compile|dispatch`: the Triton kernels compiled ahead of time, and what `auto` measured."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from slimtune.cli.app import command_group, console, err_console, guarded

kernels_app = command_group(
    "kernels",
    "The fused kernels: compile them for GPUs you do not have (registers, spills, shared memory), and list "
    "the backends `train.kernels: auto` measured on this machine.",
)


@kernels_app.command("compile")
@guarded
def compile_cmd(
    arch: Annotated[str, typer.Option("--arch", help="Comma-separated targets: sm_80 (A100), sm_86 (RTX 30xx), "
                                      "sm_89 (RTX 40xx, L4), sm_90 (H100).")] = "sm_80,sm_86,sm_89,sm_90",
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    all_variants: Annotated[bool, typer.Option("--all", help="Every registered variant (fp16, Gemma widths, "
                                               "softcap...), not only those of Llama-3.1-8B and Qwen2.5-3B.")] = False,
) -> None:
    """Compile every kernel variant a QLoRA run on Llama-3.1-8B / Qwen2.5-3B launches, ahead of time, with the
    installed triton (no GPU needed); exit 1 if one fails or needs more shared memory than the arch allows."""
    from slimtune.ops.compile_matrix import compile_matrix

    archs = [a.strip() for a in arch.split(",") if a.strip()]
    with Progress(TextColumn("compiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[what]}"), console=err_console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("compile", total=None, what="capturing launches")
        rows = compile_matrix(archs, all_variants=all_variants,
                              progress=lambda done, total, what: bar.update(task, completed=done, total=total,
                                                                            what=what))  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        _print_table(rows, archs)
    if not all(r["ok"] for r in rows):
        raise typer.Exit(1)


def _print_table(rows: list[dict], archs: list[str]) -> None:
    table = Table(title="kernel x arch: registers / spill bytes / shared KiB", title_justify="left")
    table.add_column("kernel", no_wrap=True)
    for a in archs:
        table.add_column(a, justify="right", no_wrap=True)
    by_kernel: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], {})[r["arch"]] = r
    for name, cells in by_kernel.items():
        out = []
        for a in archs:
            r = cells.get(a)
            if r is None:
                out.append("")
            elif "registers" not in r:
                out.append(f"[red]error[/] {escape(r['error'][:40])}")
            else:
                cell = f"{r['registers']} / {r['spill_bytes']} / {r['shared_bytes'] / 1024:.1f}"
                out.append(cell if r["ok"] else f"[red]{cell} > {r['shared_limit_kib']}[/]")
        table.add_row(escape(name), *out)
    console.print(table)
    bad = sum(not r["ok"] for r in rows)
    console.print(f"{len(by_kernel)} kernel variants x {len(archs)} archs: "
                  + ("[green]all compiled within limits[/]" if not bad else f"[red]{bad} failed[/]"))  # fmt: skip


@kernels_app.command("dispatch")
@guarded
def dispatch_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the cache file as JSON.")] = False,
) -> None:
    """The verdicts `train.kernels: auto` measured and cached on this machine (per GPU, versions, op, shape)."""
    from slimtune.ops.autotune import cache_path

    path = cache_path()
    data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if as_json:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
        return
    if not data:
        console.print(f"no measured verdicts yet ({path or 'disk cache off'}); they appear after the first CUDA run "
                      "with train.kernels: auto", highlight=False)  # fmt: skip
        return
    table = Table(title=str(path), title_justify="left")
    for col in ("machine", "op | dtype | shape class", "backend", "why"):
        table.add_column(col)
    for env_key, entries in data.items():
        for key, v in entries.items():
            table.add_row(escape(env_key), escape(key), v.get("backend", "?"), escape(v.get("why", "")))
    console.print(table)
