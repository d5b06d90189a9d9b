"""The adapter alone as a llama.cpp LoRA GGUF (``llama-cli -m base.gguf --lora adapter.gguf``, Ollama ``ADAPTER``).

Format facts (llama.cpp's LoRA loader): ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``; per adapted weight two tensors ``<name>.weight.lora_a`` (r, in) and ``<name>.weight.lora_b``
(out, r) under the base's llama.cpp names; the loader scales by alpha / r with r read from lora_a. Every module's
own scale (alpha/r, rsLoRA's alpha/√r, per-module ranks) is folded into lora_b and alpha is written as the common
rank, so llama.cpp's scale is exactly 1. Llama-architecture Q/K rows are permuted as in the full export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter, get_tensor_name_map
from gguf.constants import MODEL_ARCH_NAMES

from slimtune.errors import SlimtuneError
from slimtune.export.gguf_export import PERMUTED_ARCHS, check_writable, resolve_base
from slimtune.export.source import PeftAdapter, hf_to_gguf_name, permute_qk


def export_lora_gguf(base: str, adapter: PeftAdapter, out_path: Path) -> Path:
    """Write ``adapter`` (a PEFT LoRA read by `read_peft`) for ``base`` as a llama.cpp LoRA GGUF (F32 tensors)."""
    from transformers import AutoConfig

    folder, extra = resolve_base(base)
    config = AutoConfig.from_pretrained(str(folder), **extra)
    arch = check_writable(config)
    if any(d.magnitude is not None for d in adapter.deltas.values()):
        raise SlimtuneError("--format gguf-lora: DoRA's magnitude vector has no llama.cpp LoRA form; use --format gguf")
    if adapter.saved:
        raise SlimtuneError(f"--format gguf-lora: fully trained modules ({', '.join(sorted(adapter.saved))}) have no "
                            "llama.cpp LoRA form; use --format gguf")
    ranks = {int(d.A.shape[0]) for d in adapter.deltas.values()}
    if len(ranks) != 1:
        raise SlimtuneError(f"--format gguf-lora: per-module ranks {sorted(ranks)}: llama.cpp takes one alpha/r per file")
    rank = ranks.pop()
    gguf_arch = next(a for a in MODEL_ARCH_NAMES if MODEL_ARCH_NAMES[a] == arch)
    name_map = get_tensor_name_map(gguf_arch, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    qk = {"attn_q": heads, "attn_k": int(getattr(config, "num_key_value_heads", None) or heads)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(out_path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))  # llama.cpp scale = alpha / r = 1: the scales are in lora_b
    for mod in sorted(adapter.deltas):
        d = adapter.deltas[mod]
        g = hf_to_gguf_name(name_map, mod + ".weight")
        if g is None:
            raise SlimtuneError(f"adapter module {mod} has no llama.cpp tensor name")
        b = d.scale * d.B.to(torch.float32)  # (out, r)
        kind = g.rsplit(".", 2)[-2]
        if arch in PERMUTED_ARCHS and kind in qk:
            b = permute_qk(b, qk[kind])
        w.add_tensor(f"{g}.lora_a", np.ascontiguousarray(d.A.to(torch.float32).numpy()))
        w.add_tensor(f"{g}.lora_b", np.ascontiguousarray(b.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
