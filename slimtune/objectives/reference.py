"""`train.preference.precompute_reference`: the reference policy's log-probs computed once, before training, and
stored beside the run, so a step runs one model.

One pass over the training and the held-out examples, in batches, with the adapters off (the base; under a stacked
adapter the frozen one stays: the SFT model) and no_grad: per paired example the chosen and the rejected sums, per
KTO example its completion's and its KL row's. They go to `<run>/reference_logps.safetensors` with a fingerprint
of the token ids; a pass cut short leaves `reference_logps.partial.safetensors` (rewritten every `SAVE_EVERY`
batches), from which the next run continues. A finished file whose fingerprint matches is loaded, not recomputed
(a resumed run, or a run whose trained weights are no longer the reference: full fine-tuning). The values are then
on the examples ("ref_chosen"/"ref_rejected" or "ref_logp"/"ref_kl_logp") and the batches carry them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slimtune.data.dataset import collate
from slimtune.errors import RecipeError
from slimtune.io import atomic_path
from slimtune.objectives.logprobs import adapters_off, completion_logps

REF_FILE = "reference_logps.safetensors"
SAVE_EVERY = 16  # batches between two saves of the partial file
_ROWS = {"preference": (("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels")),
         "kto": (("input_ids", "labels"), ("kl_input_ids", "kl_labels"))}
_KEYS = {"preference": ("ref_chosen", "ref_rejected"), "kto": ("ref_logp", "ref_kl_logp")}


def fingerprint(examples: list[dict[str, Any]], kind: str) -> int:
    """crc32 of every scored row's token ids and labels, in order (a changed dataset is recomputed)."""
    crc = 0
    for e in examples:
        for ids, lab in _ROWS[kind]:
            crc = zlib.crc32(e[ids].numpy().tobytes(), crc)
            crc = zlib.crc32(e[lab].numpy().tobytes(), crc)
    return crc


def _batch_logps(model: nn.Module, exs: list[dict[str, Any]], kind: str, pad_id: int) -> torch.Tensor:
    """(len(exs), 2) reference log-prob sums of the two scored rows of each example."""
    device = next(model.parameters()).device
    out = []
    for ids_key, lab_key in _ROWS[kind]:
        b = collate([{"input_ids": e[ids_key], "labels": e[lab_key]} for e in exs], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        out.append(completion_logps(model, b["input_ids"], b["labels"], b["attention_mask"]).sums.double().cpu())
    return torch.stack(out, dim=1)


def precompute_reference(model: nn.Module, examples: list[dict[str, Any]], *, kind: str, pad_id: int, path: Path,
                         batch_size: int = 8, log: Callable[[str], Any] | None = None) -> torch.Tensor:
    """The (N, 2) reference log-probs of ``examples`` (computed, continued from a partial file, or loaded), also
    set on the examples. ``kind``: "preference" or "kto"."""
    path = Path(path)
    partial = path.with_name(path.name.replace(".safetensors", ".partial.safetensors"))
    fp = torch.tensor([fingerprint(examples, kind), len(examples)], dtype=torch.int64)
    values, done = torch.zeros((len(examples), 2), dtype=torch.float64), 0
    for f in (path, partial):
        if f.is_file():
            saved = load_file(str(f))
            if torch.equal(saved["fingerprint"], fp):
                values, done = saved["values"], int(saved["done"])
                break
    if done < len(examples):
        if log is not None:
            log(f"precompute_reference: {len(examples) - done} examples to score with the adapters off"
                f"{f' (continuing at {done})' if done else ''}")
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), adapters_off(model):
                for k, s in enumerate(range(done, len(examples), batch_size)):
                    e = min(len(examples), s + batch_size)
                    values[s:e] = _batch_logps(model, examples[s:e], kind, pad_id)
                    done = e
                    if (k + 1) % SAVE_EVERY == 0 and done < len(examples):
                        _save(partial, values, done, fp)
        finally:
            model.train(was)
        _save(path, values, done, fp)
        partial.unlink(missing_ok=True)
    for e, v in zip(examples, values.tolist()):
        e[_KEYS[kind][0]], e[_KEYS[kind][1]] = v
    return values


def _save(path: Path, values: torch.Tensor, done: int, fp: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"values": values.contiguous(), "done": torch.tensor(done), "fingerprint": fp}, str(tmp))


def prepare_reference(objective, recipe, model: nn.Module, data, run_dir: Path, *, full_ft: bool,
                      log: Callable[[str], Any] | None = None) -> bool:
    """Precompute (or load) the reference log-probs of the training and held-out examples when the recipe asks
    for it (`train.preference.precompute_reference`; default: only for full fine-tuning, where it is required).
    Returns whether it did."""
    if not objective.uses_reference:
        return False
    want = recipe.train.preference.precompute_reference
    if want is None:
        want = full_ft
    if full_ft and not want:
        raise RecipeError("train.preference.precompute_reference: full fine-tuning trains the base itself, so its "
                          "reference log-probs must be computed before training (set it true, or train an adapter)")
    if want:
        precompute_reference(model, list(data.examples) + list(data.holdout), kind=recipe.data.format,
                             pad_id=data.pad_id, path=Path(run_dir) / REF_FILE,
                             batch_size=recipe.train.micro_batch, log=log)
    return bool(want)
