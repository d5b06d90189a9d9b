"""LoRAM step 2 (optional): align the pruned model by continued pretraining on general text (DESIGN §2, LoRAM).

Pruning removes most of each pruned layer's KV groups and MLP neurons; the LoRAM paper restores part of the lost
knowledge with a short continued pretraining of the pruned model ("alignment") on general text before any adapter is
trained, and does it once per pruned base. This is full fine-tuning of the pruned model, not an adapter: every
weight trains except lm_head (with tied embeddings the embedding matrix *is* lm_head, so it stays frozen as well).

The loop is the one training loop, ``Trainer`` with ``trainable="model"``: the same loss normalisation, optimizer,
schedule, clipping, ``on_nonfinite``, ``save_every``/``keep_checkpoints`` checkpoints (of the trained weights),
SIGINT/SIGTERM stop, ``--resume`` and callbacks as an adapter stage. Weights, gradients and optimizer state are
float32 (no mixed precision: alignment is a small job on a small pruned model; 16 bytes per trained parameter plus
activations). ``train.eval_every`` (validation loss on ``data.val_split``) and ``train.report_to`` work as in a
training stage. Its run folder is ``<out_dir>.run/`` (metrics.jsonl, logger files, and the checkpoints, which
are deleted once the aligned model is written).

Output: a pruned-model folder like the input (`save_pruned`: config.json = the original config, pruned safetensors,
loram.json unchanged) plus the tokenizer, ``metrics.jsonl`` and ``align_summary.json``. It is written into a
temporary sibling folder and renamed into place, so a folder that holds ``align_summary.json`` is a finished
alignment (reused, never redone).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from slimtune.config.recipe import LoramAlignConfig, Recipe
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir
from slimtune.models.load import load_model
from slimtune.models.pruned import KeptIndex, save_pruned
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.evaluation import recipe_callbacks
from slimtune.train.loop import Trainer
from slimtune.train.distributed import barrier, is_main
from slimtune.train.report import Reporter, SilentReporter
from slimtune.train.state import latest_checkpoint

__all__ = ["ALIGN_SUMMARY", "align_pruned"]

ALIGN_SUMMARY = "align_summary.json"


def _align_recipe(model_dir: Path, cfg: LoramAlignConfig, work: Path, attn_implementation: str | None) -> Recipe:
    """The alignment as a one-stage recipe for ``Trainer``: the pruned folder in float32, cfg's data and train."""
    model = {"name": str(model_dir)}
    if attn_implementation:
        model["attn_implementation"] = attn_implementation
    return Recipe.model_validate({
        "name": "loram-align",
        "model": model,
        "quant": {"mode": "none", "compute_dtype": "float32"},
        "adapter": {"kind": "full"},  # full fine-tuning; which weights train is set by _unfreeze_all_but_head
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "output": {"dir": str(work), "export_peft": False},
    })


def _unfreeze_all_but_head(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)  # tied embeddings: this is the embedding matrix too
    if getattr(head, "bias", None) is not None:
        head.bias.requires_grad_(False)


def align_pruned(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: LoramAlignConfig,
    *,
    base_dir: Path = Path("."),
    reporter: Reporter | None = None,
    attn_implementation: str | None = "sdpa",
    resume: bool = False,
    stop_after: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Continued pretraining of the pruned model in `model_dir`; writes the aligned pruned model to `out_dir`.

    Returns the summary (also in out_dir/align_summary.json): the trainer's summary plus ``from`` and
    ``trainable_params``. A finished alignment already in `out_dir` is returned as is. An interrupted one (SIGINT,
    ``stop_after``) returns its summary with ``interrupted: True`` and continues with ``resume=True``.
    """
    reporter = reporter or SilentReporter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    done = out_dir / ALIGN_SUMMARY
    if done.is_file():
        reporter.log(f"LoRAM align: already done ({done}), reused")
        return json.loads(done.read_text())
    work = out_dir.with_name(out_dir.name + ".run")
    if not resume and latest_checkpoint(work / "checkpoints") is not None:
        raise SlimtuneError(f"{work / 'checkpoints'} holds checkpoints of an unfinished alignment: continue it with "
                            f"--resume, or delete {work} to start over")
    if cfg.train.keep_best:
        raise SlimtuneError("loram.align.train.keep_best: alignment keeps no best adapter (it trains no adapter)")
    recipe = _align_recipe(model_dir, cfg, work, attn_implementation)
    reporter.log(f"LoRAM align: loading the pruned model {model_dir}")
    loaded = load_model(recipe.model, recipe.quant, device=cfg.train.device)
    _unfreeze_all_but_head(loaded.model)
    trainer = Trainer(recipe, run_dir=work, base_dir=base_dir, reporter=reporter, loaded=loaded, stage="align",
                      callbacks=list(callbacks or []) + (recipe_callbacks(recipe) if is_main() else []),
                      trainable="model")
    trainer.setup()
    if resume:
        trainer.resume()
    summary = trainer.train(stop_after=stop_after)
    summary["from"] = str(model_dir)
    summary["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if summary["interrupted"]:
        trainer.cleanup()
        return summary
    if not is_main():  # torchrun: rank 0 writes the aligned model; this rank reads its summary
        trainer.cleanup()
        barrier()
        return json.loads(done.read_text())

    model = trainer.model
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = True

    with atomic_dir(out_dir) as tmp:
        save_pruned(model.to("cpu"), KeptIndex.load(model_dir), tmp)
        trainer.tokenizer.save_pretrained(tmp)
        shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
        (tmp / ALIGN_SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    trainer.cleanup()
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # full weights: large; the metrics and logs stay
    barrier()  # torchrun: the other ranks read the summary now
    reporter.log(f"LoRAM align: loss {summary['first_loss']:.4f} → {summary['final_loss']:.4f} in "
                 f"{summary['steps']} steps; written to {out_dir}")
    return summary
