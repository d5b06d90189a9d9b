"""LoRAM step 4: recover an adapter trained on a pruned model to the original model's shapes (DESIGN §2, LoRAM).

Conventions as PEFT: a LoRA module on W (out, in) has A (r, in), B (out, r) and ΔW = s·B A. On a pruned layer:

- q/k/v/gate/up (output dimension pruned): B gets zero rows at the pruned output positions (and an optional
  lora_B bias zero entries); A is copied.
- o/down (input dimension pruned): A gets zero columns at the pruned input positions; B (and its bias) is copied.

Kept positions keep their trained values in the original order (the kept indices are ascending, see
`slimtune.loram.prune.KeptIndex.channels`), so the recovered ΔW equals the trained ΔW on the kept rows/columns and
is zero elsewhere. Every other tensor (unpruned layers, embeddings, norms in modules_to_save) is copied unchanged.
Scale, rank, rank_pattern, rsLoRA and layers_to_transform live in adapter_config.json and are unaffected.

Refused with a SlimtuneError, because they cannot be expanded exactly from the adapter alone:
- DoRA magnitudes (`lora_magnitude_vector`) on a pruned layer: DoRA rescales each output row by m / ‖W + ΔW‖_row;
  for o/down the row norm runs over the pruned input columns too, so the pruned-model norms do not decompose
  (DoRA confined to unpruned layers, e.g. with layers_to_transform, is copied and stays exact);
- full tensors of a pruned projection (PEFT `bias="all"|"lora_only"` or modules_to_save on q/k/v/o/gate/up/down):
  the pruned entries would have to come from the original weights.

The function works on PEFT-format folders (adapter_config.json + adapter_model.safetensors), so it does not care
how the adapter was trained.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_path, write_text_atomic
from slimtune.loram.prune import KeptIndex

__all__ = ["recover_adapter", "recover_state_dict"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"



def _key_pattern(kept: KeptIndex) -> re.Pattern:
    """…layers.{i}.{block}.{proj}.{rest} for the projections of the map's family (its ArchSpec)."""
    spec = kept.spec
    paths = "|".join(re.escape(spec.block_of(p)) for p in spec.proj_names)
    return re.compile(rf"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<path>{paths})\.(?P<rest>.+)$")

# rest → what it is; an optional adapter name may sit before the last part (PEFT strips "default" on save)
_LORA_A = re.compile(r"^lora_A(?:\.[^.]+)?\.weight$")
_LORA_B = re.compile(r"^lora_B(?:\.[^.]+)?\.(?P<p>weight|bias)$")


def _expand(t: torch.Tensor, dim: int, idx: torch.Tensor, size: int) -> torch.Tensor:
    """A zero tensor with `size` along `dim`, holding `t` at positions `idx` (ascending)."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.index_copy_(dim, idx.to(t.device), t)
    return out


def recover_state_dict(
    state: Mapping[str, torch.Tensor], kept: KeptIndex, *, where: str = ADAPTER_WEIGHTS
) -> dict[str, torch.Tensor]:
    """Expand a PEFT LoRA state dict trained on the pruned model to the original shapes (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    pattern = _key_pattern(kept)
    for key, t in state.items():
        m = pattern.match(key)
        if m is None or int(m["layer"]) not in kept.layers:
            out[key] = t  # not a projection of a pruned layer: nothing was pruned along its dimensions
            continue
        layer, proj, rest = int(m["layer"]), m["path"].rsplit(".", 1)[-1], m["rest"]
        idx, size = kept.channels(layer, proj), kept.original_size(proj)
        if "lora_magnitude_vector" in rest:
            raise SlimtuneError(
                f"{where}: {key} is a DoRA magnitude on pruned layer {layer}; DoRA's row norms do not decompose "
                "over pruned channels, so LoRAM recovery supports plain LoRA/rsLoRA there (restrict DoRA to "
                "unpruned layers, or train LoRA)"
            )
        b = _LORA_B.match(rest)
        if _LORA_A.match(rest):
            dim, part = (1, "lora_A columns") if kept.pruned_dim(proj) == "in" else (None, "")
        elif b:
            dim, part = (0, f"lora_B {b['p']} rows") if kept.pruned_dim(proj) == "out" else (None, "")
        else:
            raise SlimtuneError(
                f"{where}: {key} is a full tensor of a pruned projection (PEFT bias='all'/'lora_only' or "
                "modules_to_save); its pruned entries cannot be recovered from the adapter alone"
            )
        if dim is None:
            out[key] = t  # the pruned dimension is not one of this matrix's dimensions
            continue
        if t.shape[dim] != idx.numel():
            raise SlimtuneError(
                f"{where}: {key} has {t.shape[dim]} {part}, but the kept-index map keeps {idx.numel()} for "
                f"layers.{layer}.{proj} — the adapter was not trained on this pruned model"
            )
        out[key] = _expand(t, dim, idx, size)
    return out


def recover_adapter(
    adapter_dir: str | os.PathLike,
    kept_index: KeptIndex | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT adapter for the ORIGINAL model from one trained on the pruned model.

    adapter_dir: a PEFT folder (adapter_config.json + adapter_model.safetensors) saved from the pruned model.
    kept_index: the KeptIndex, or a pruned-model folder / loram.json path to load it from.
    out_dir: where the recovered adapter goes (created; its two files are replaced atomically).
    base_model_name_or_path: written into adapter_config.json; defaults to the original model recorded in the
    kept-index map (left unchanged when neither is known).
    Returns out_dir.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(adapter_dir), Path(out_dir)
    kept = kept_index if isinstance(kept_index, KeptIndex) else KeptIndex.load(kept_index)
    cfg_path, w_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise SlimtuneError(f"{cfg_path}: not found (expected a PEFT adapter folder)")
    if not w_path.is_file():
        raise SlimtuneError(f"{w_path}: not found (only safetensors adapters are supported)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SlimtuneError(f"{cfg_path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise SlimtuneError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA; LoRAM recovers LoRA")

    with safe_open(str(w_path), "pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    recovered = recover_state_dict(state, kept, where=str(w_path))

    config["base_model_name_or_path"] = (
        base_model_name_or_path or kept.base_model_name_or_path or config.get("base_model_name_or_path")
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in recovered.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    write_text_atomic(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    return out
