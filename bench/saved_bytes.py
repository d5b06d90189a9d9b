"""Bytes saved for backward per token per decoder layer: slimtune's fused path vs HF transformers + PEFT (CPU).

    python bench/saved_bytes.py                     # hidden 256, MLP 688, 8/4 heads, seq 256, NF4, LoRA r16 x 7
    python bench/saved_bytes.py --layers 2 --seq 128 --json out.json

The device-independent measure of activation memory (DESIGN §4): every tensor autograd keeps for backward, counted
once per storage (slimtune.bench.memory.saved_bytes). Parameters, NF4 codes and LoRA factors are excluded. Both
models share the config, random weights, NF4 base (bitsandbytes Linear4bit, double quant, bf16 compute), tokens,
rank, alpha and targets (q, k, v, o, gate, up, down; dropout 0), and no gradient checkpointing.

(a) slimtune: slimtune adapters + ``fuse_model`` + ``causal_lm_loss`` (torch backend on CPU: what a Function saves
    is the same on both backends).
(b) HF + PEFT: ``peft.get_peft_model(model, LoraConfig(...))`` on the same 4-bit model, ``model(ids, labels=...)``.
    No ``prepare_model_for_kbit_training`` (it would upcast the norms to fp32 and make the baseline larger).

Per decoder layer: each side is measured with L and 2L decoder layers on the same tokens, and the difference is
divided by L·tokens, so the embedding, final norm, logits/loss and the shared rotary cos/sin cancel. Attention is
SDPA on both sides and saves the same tensors there (q, k, v, output, logsumexp).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn as nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(n_layers: int, args) -> nn.Module:
    import transformers

    from slimtune.models.load import quantize_linears

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=n_layers, vocab_size=args.vocab,
        max_position_embeddings=max(512, args.seq), tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize_linears(model, mode="nf4", compute_dtype=torch.bfloat16, double_quant=True)
    model.train()
    return model


def slimtune_model(n_layers: int, args) -> tuple[nn.Module, object]:
    from slimtune.adapters.inject import inject
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.models.fused import fuse_model

    model = build_base(n_layers, args)
    inject(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS))
    report = fuse_model(model)
    return model, report


def peft_model(n_layers: int, args) -> nn.Module:
    import peft

    model = build_base(n_layers, args)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, cfg)


def measure(kind: str, n_layers: int, args, ids: torch.Tensor):
    from slimtune.bench.memory import saved_bytes
    from slimtune.models.fused import causal_lm_loss

    if kind == "slimtune":
        model, report = slimtune_model(n_layers, args)
        fn = lambda: causal_lm_loss(model, input_ids=ids, labels=ids)  # noqa: E731
    else:
        model, report = peft_model(n_layers, args), None
        fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    res = saved_bytes(fn, modules=[model])
    return res, report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4, help="L: measured with L and 2L decoder layers")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--breakdown", action="store_true", help="print the largest saved activations per side")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    tokens = args.batch * args.seq
    out: dict = {"config": vars(args).copy(), "tokens": tokens}
    out["config"].pop("json", None)
    for kind in ("slimtune", "hf_peft"):
        one, report = measure(kind, args.layers, args, ids)
        two, _ = measure(kind, 2 * args.layers, args, ids)
        per = (two.activation_bytes - one.activation_bytes) / (args.layers * tokens)
        out[kind] = {"bytes_per_token_per_layer": per, f"total_bytes_L{args.layers}": one.activation_bytes,
                     f"total_bytes_L{2 * args.layers}": two.activation_bytes}
        if report is not None:
            out[kind]["fuse_report"] = report.lines()
        if args.breakdown:
            print(f"--- {kind}: largest saved activations with {2 * args.layers} layers (bytes)")
            for label, n in list(two.by_shape.items())[:15]:
                print(f"  {label:40s} {n:>12,d}")
    out["ratio"] = out["slimtune"]["bytes_per_token_per_layer"] / out["hf_peft"]["bytes_per_token_per_layer"]

    h, i = args.hidden, args.intermediate
    print(f"model: Llama hidden {h}, MLP {i}, heads {args.heads}/{args.kv_heads}, NF4 base, LoRA r{args.rank} on "
          f"{len(TARGETS)} projections, bf16, seq {args.seq} x batch {args.batch}, no gradient checkpointing")
    for line in out["slimtune"].get("fuse_report", []):
        print(f"  {line}")
    for kind, label in (("slimtune", "slimtune fused"), ("hf_peft", "HF + PEFT")):
        v = out[kind]["bytes_per_token_per_layer"]
        print(f"{label:16s} {v:10.1f} bytes saved / token / decoder layer  ({v / (2 * h):.2f} x hidden bf16)")
    print(f"ratio slimtune / HF+PEFT = {out['ratio']:.3f}  (target <= 0.4)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
