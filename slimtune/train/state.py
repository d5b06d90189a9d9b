"""Crash-safe checkpoints (DESIGN.md §7).

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding the native adapter, ``trainer.pt`` (optimizer,
scheduler, RNG states, data position, step, stage) and ``recipe.json``. It is written into a temporary sibling
folder, every file is fsynced, a ``COMPLETE`` marker is written last, and the folder is renamed into place: a crash
at any instant leaves either the previous checkpoints or the new complete one. A folder without the marker (or a
temporary one) is ignored with a warning.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.errors import RecipeError
from slimtune.io import atomic_dir, fsync_dir

COMPLETE = "COMPLETE"
# Recipe keys whose change makes a resume inexact (the data order, the batch, the adapter or the model change).
RESUME_KEYS = ("model", "quant", "adapter", "data", "train.micro_batch", "train.grad_accum", "train.seed",
               "train.steps", "train.epochs", "train.optimizer", "train.lr", "train.schedule", "train.warmup")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_checkpoint(ckpt_root: Path, step: int, writer, *, keep: int) -> Path:
    """Call ``writer(tmp_dir)`` to fill a temporary folder, then make it the checkpoint of ``step`` atomically."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    for stale in ckpt_root.iterdir():  # leftovers of a crash (one writer per run folder): garbage, not progress
        if stale.is_dir() and (stale.name.startswith(".tmp-") or not (stale / COMPLETE).is_file()):
            shutil.rmtree(stale, ignore_errors=True)
    # re-saving the same step (e.g. the final save after a periodic one) replaces it
    with atomic_dir(final, tmp=ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}", fsync=True) as tmp:
        writer(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))  # last: a folder without it is half-written
    for old in list_checkpoints(ckpt_root)[:-keep]:
        (old / COMPLETE).unlink()  # first, so a crash mid-delete leaves an ignored folder, never a broken checkpoint
        fsync_dir(old)
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path, warn=None) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones are skipped (``warn`` is told about them)."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in sorted(ckpt_root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(".tmp-") or not (p / COMPLETE).is_file():
            if warn is not None:
                warn(f"ignoring half-written checkpoint {p}")
            continue
        out.append(p)
    return out


def latest_checkpoint(ckpt_root: Path, warn=None) -> Path | None:
    found = list_checkpoints(ckpt_root, warn)
    return found[-1] if found else None


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def check_resume_compatible(saved: dict, current: dict, *, where: str) -> None:
    """Refuse a resume whose recipe changed in a way that makes it inexact, naming the changed keys."""
    changed: list[str] = []
    for key in RESUME_KEYS:
        changed += _diff(_get(saved, key), _get(current, key), key)
    if changed:
        raise RecipeError(
            f"cannot resume from {where}: the recipe changed ({', '.join(changed)}); resuming would not be exact — "
            "restore those keys or start a new run"
        )
