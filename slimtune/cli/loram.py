"""`slimtune loram prune|recover`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slimtune.cli.app import RichReporter, command_group, console, guarded


loram_app = command_group(
    "loram",
    "LoRAM steps on their own: prune a base, recover an adapter trained on the pruned model. A recipe with a "
    "`loram:` section runs the whole pipeline with `slimtune run`.",
)


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
