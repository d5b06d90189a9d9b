"""Model arithmetic (the merge stage of LayRA): add an instruction task vector to a base + adapter model.

    θ = θ_base + Δ_adapter + λ · (θ_instruct − θ_base)

``apply_task_vector`` does it in place on a dense model that already holds θ_base + Δ_adapter (an adapter merged into
its base); ``arithmetic_merge`` is the folder-to-folder job behind the CLI: load the base, merge the adapter (native
or PEFT format), add λ times the task vector, save a transformers folder. The base and instruct weights are read
tensor by tensor from their safetensors files, so only one full model is ever in memory.

Numerics: each tensor is computed in fp32 as lerp(θ_base, θ_instruct, λ) + (θ − θ_base), then cast back, so
λ = 0 returns the model untouched and λ = 1 with a zero adapter gives the instruct weights bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import is_4bit
from slimtune.adapters.export import NATIVE_CONFIG, PEFT_CONFIG, load_native
from slimtune.adapters.inject import adapters_of, is_linear, merge

__all__ = ["apply_task_vector", "arithmetic_merge", "TensorSource"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


class TensorSource:
    """Named tensors from a model, a state dict, or a folder of safetensors files (read lazily, one at a time)."""

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | str | Path):
        self._files: dict[str, Path] = {}
        self._tensors: Mapping[str, torch.Tensor] = {}
        if isinstance(source, nn.Module):
            self._tensors = source.state_dict()
            self.label = type(source).__name__
        elif isinstance(source, Mapping):
            self._tensors = source
            self.label = "state dict"
        else:
            folder = Path(source)
            self.label = str(folder)
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no .safetensors files (save the model with save_pretrained)")
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for key in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self._files[key] = f

    def get(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors[name]
        if name in self._files:
            from safetensors import safe_open

            with safe_open(str(self._files[name]), framework="pt") as h:
                return h.get_tensor(name)
        raise KeyError(f"{self.label}: no tensor named {name!r}")


@torch.no_grad()
def apply_task_vector(
    model: nn.Module,
    base: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    instruct: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    lam: float,
) -> nn.Module:
    """In place: θ ← θ + λ·(θ_instruct − θ_base) for every parameter of ``model`` (returned).

    ``model`` holds θ_base + Δ_adapter as dense weights (merge adapters and dequantize 4-bit layers first);
    ``base`` and ``instruct`` are models, state dicts or saved folders with the same parameter names and shapes.
    """
    if adapters_of(model):
        raise ValueError("apply_task_vector: the model still has adapters; merge them first (inject.merge)")
    if any(is_linear(m) and is_4bit(m) for m in model.modules()):
        raise ValueError("apply_task_vector: the model has 4-bit layers; dequantize it first")
    lam = float(lam)
    if lam == 0.0:
        return model
    base_src, inst_src = TensorSource(base), TensorSource(instruct)
    for name, p in model.named_parameters():
        b = base_src.get(name).to(p.device, torch.float32)
        i = inst_src.get(name).to(p.device, torch.float32)
        if b.shape != p.shape or i.shape != p.shape:
            raise ValueError(
                f"apply_task_vector: {name} has shape {tuple(p.shape)} in the model, {tuple(b.shape)} in the base "
                f"and {tuple(i.shape)} in the instruct model"
            )
        new = torch.lerp(b, i, lam) + (p.float() - b)  # θ_base + λ(θ_instruct − θ_base) + Δ_adapter
        p.copy_(new.to(p.dtype))
    return model


def _load_adapter_and_merge(model: nn.Module, adapter_path: Path) -> nn.Module:
    if (adapter_path / NATIVE_CONFIG).is_file():
        load_native(model, adapter_path)
        return merge(model)
    if (adapter_path / PEFT_CONFIG).is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    raise FileNotFoundError(
        f"{adapter_path}: neither a slimtune adapter ({NATIVE_CONFIG}) nor a PEFT one ({PEFT_CONFIG})"
    )


def arithmetic_merge(
    base_path: str | Path,
    adapter_path: str | Path | None,
    instruct_path: str | Path,
    lam: float,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_from: str = "instruct",
) -> Path:
    """Write θ_base + Δ_adapter + λ·(θ_instruct − θ_base) as a transformers folder at ``out_dir``.

    ``base_path`` / ``instruct_path``: local transformers folders (safetensors) of the same architecture;
    ``adapter_path``: a slimtune native or PEFT adapter trained on the base (None: task vector only);
    ``dtype``: the saved dtype (default: the base's); ``tokenizer_from``: "instruct" (its chat template) or "base"
    — its tokenizer files and generation config are copied. A ``slimtune_arithmetic.json`` records the inputs.
    """
    from transformers import AutoModelForCausalLM

    base_path, instruct_path, out = Path(base_path), Path(instruct_path), Path(out_dir)
    if tokenizer_from not in ("instruct", "base"):
        raise ValueError(f"tokenizer_from must be 'instruct' or 'base', got {tokenizer_from!r}")
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype or "auto")
    if adapter_path is not None:
        model = _load_adapter_and_merge(model, Path(adapter_path))
    apply_task_vector(model, base_path, instruct_path, lam)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok_src = instruct_path if tokenizer_from == "instruct" else base_path
    for fname in TOKENIZER_FILES:
        if (tok_src / fname).is_file():
            shutil.copy2(tok_src / fname, out / fname)
    record: dict[str, Any] = {
        "formula": "theta_base + delta_adapter + lam * (theta_instruct - theta_base)",
        "base": str(base_path),
        "adapter": None if adapter_path is None else str(adapter_path),
        "instruct": str(instruct_path),
        "lam": float(lam),
        "tokenizer_from": tokenizer_from,
    }
    (out / "slimtune_arithmetic.json").write_text(json.dumps(record, indent=2))
    return out
