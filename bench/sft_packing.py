"""SFT packing vs padding on the CPU: real (non-pad) tokens per second of forward + backward.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_packing.py [--steps 18] [--micro-batch 8] [--max-seq-len 512]

Short SFT examples of varied length (UDHR sentences as instruction → translation pairs, 20-200 tokens) with the
tiny tokenizer, on a small Llama (hidden 256, 4 layers) with LoRA r8 on every linear layer. Padded: one example
per row, right-padded to the longest of its micro-batch. Packed (`data.packing: true`): examples side by side in
rows of max_seq_len with block-diagonal attention. Both see the same examples; only the layout differs. No
optimizer step (this measures the forward/backward work per real token). Interleaved rounds; the best round of
each layout is reported (with the speed-up of every round).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import inject
from slimtune.config.data import DataConfig
from slimtune.data import build_dataset
from slimtune.models.tiny import tiny_tokenizer, udhr_texts
from slimtune.train.loop import causal_lm_loss_sum


def _records() -> list[dict]:
    out = []
    for lang in ("eng", "ita", "spa", "cat"):
        for text in udhr_texts(lang):
            words = text.split()
            for i in range(0, len(words), 37):
                chunk = words[i:i + 12 + (i * 7) % 60]  # 12-72 words: short SFT examples of varied length
                if len(chunk) > 4:
                    out.append({"instruction": "Repeat: " + " ".join(chunk[: len(chunk) // 2]),
                                "output": " ".join(chunk[len(chunk) // 2:])})
    return out


def measure(data, model, micro_batch: int, steps: int) -> dict:
    tokens, t0 = 0, None
    batches = data.batches(micro_batch, epoch=0)
    for i in range(steps + 2):  # 2 warm-up batches
        try:
            b = next(batches)
        except StopIteration:
            break
        if i == 2:
            t0, tokens = time.perf_counter(), 0
        loss = causal_lm_loss_sum(model, b)
        loss.backward()
        model.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    secs = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(secs, 2), "tokens_per_second": round(tokens / secs, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                   num_key_value_heads=4, num_hidden_layers=4, vocab_size=len(tok))
    model = transformers.LlamaForCausalLM(cfg).float().train()
    for p in model.parameters():
        p.requires_grad_(False)
    inject(model, get_adapter_class("lora").Config(rank=8, alpha=16.0))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sft.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
        kw = dict(sources=[{"path": str(path)}], format="instruction", max_seq_len=args.max_seq_len)
        padded = build_dataset(DataConfig(**kw, packing=False), tok, base_dir=Path(d), seed=0)
        packed = build_dataset(DataConfig(**kw, packing=True), tok, base_dir=Path(d), seed=0)
    lengths = [len(e["input_ids"]) for e in padded.examples]
    per_row = len(padded) / len(packed)
    # the packed run gets as many real tokens as the padded one: fewer micro-batches of the same row count
    steps_packed = max(1, round(args.steps / per_row))
    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    for _ in range(args.rounds):  # interleaved rounds: a noisy shared CPU slows both layouts alike
        runs["padded"].append(measure(padded, model, args.micro_batch, args.steps))
        runs["packed"].append(measure(packed, model, args.micro_batch, steps_packed))
    best = {k: max(v, key=lambda m: m["tokens_per_second"]) for k, v in runs.items()}
    res = {
        "examples": len(padded), "mean_example_tokens": round(sum(lengths) / len(lengths), 1),
        "packed_rows": len(packed), "examples_per_packed_row": round(per_row, 2),
        "padded": best["padded"], "packed": best["packed"],
        "speedup_per_round": [round(b["tokens_per_second"] / a["tokens_per_second"], 2)
                              for a, b in zip(runs["padded"], runs["packed"])],
        "micro_batch": args.micro_batch, "max_seq_len": args.max_seq_len, "threads": torch.get_num_threads(),
    }
    res["speedup"] = round(res["packed"]["tokens_per_second"] / res["padded"]["tokens_per_second"], 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
