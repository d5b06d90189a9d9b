"""Loss curves of fp32 vs bf16 adapters (fp32 masters in the optimizer) vs 8-bit AdamW, on a tiny Llama (CPU).

    python bench/adapter_dtype.py                      # 3 seeds x 3 settings, 40 steps each
    python bench/adapter_dtype.py --steps 30 --seeds 1 --json out.json

Same model (random 2-layer Llama, hidden 512, NF4 base, bf16 compute), data (the Sardinian UDHR text, 32-token
sequences), LoRA r8 all-linear, lr 5e-3 cosine, batch 4, for every setting; each seed changes the adapter init and
the data order. "Noise" is the spread between seeds of the fp32 runs: a setting is "within noise" when its mean
final loss differs from fp32's by less than the largest fp32 seed-to-seed difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

SETTINGS = {
    "fp32 adapters, AdamW": {"adapter_dtype": "float32", "optimizer": "adamw"},
    "bf16 adapters + fp32 masters, AdamW": {"adapter_dtype": "bfloat16", "optimizer": "adamw"},
    "bf16 adapters + fp32 masters, 8-bit AdamW": {"adapter_dtype": "bfloat16", "optimizer": "adamw8bit"},
}


def _model_dir(root: Path) -> Path:
    import torch
    import transformers

    from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer

    d = root / "model"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    # hidden 512: every LoRA factor has >= 4,096 values, so 8-bit AdamW really keeps 8-bit state (bitsandbytes
    # keeps smaller tensors in 32-bit)
    cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=4)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run(model_dir: Path, root: Path, *, seed: int, steps: int, **train) -> list[float]:
    from slimtune.config.recipe import Recipe
    from slimtune.models.tiny import udhr_path
    from slimtune.train.loop import Trainer

    recipe = Recipe.model_validate({
        "model": {"name": str(model_dir)},
        "quant": {"mode": "nf4", "compute_dtype": "bfloat16"},
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16},
        "data": {"sources": [{"path": str(udhr_path("src"))}], "format": "text", "max_seq_len": 32},
        "train": {"lr": 5e-3, "steps": steps, "micro_batch": 4, "warmup": 3, "seed": seed, "device": "cpu",
                  **train},
        "output": {"dir": str(root / f"run-{seed}-{train['adapter_dtype']}-{train['optimizer']}"),
                   "export_peft": False},
    })
    t = Trainer(recipe, run_dir=Path(recipe.output.dir), handle_signals=False)
    t.setup()
    t.train()
    losses = [h.loss for h in t.history]
    t.cleanup()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _model_dir(root)
        for label, train in SETTINGS.items():
            curves = [run(model_dir, root, seed=s, steps=args.steps, **train) for s in range(1, args.seeds + 1)]
            out[label] = curves
            tail = [statistics.fmean(c[-5:]) for c in curves]  # mean of the last 5 steps per seed
            print(f"{label:45s} first {statistics.fmean(c[0] for c in curves):.4f}  last-5 mean per seed "
                  + " ".join(f"{x:.4f}" for x in tail), flush=True)
    ref = [statistics.fmean(c[-5:]) for c in out["fp32 adapters, AdamW"]]
    noise = max(ref) - min(ref)
    summary = {}
    for label, curves in out.items():
        tail = [statistics.fmean(c[-5:]) for c in curves]
        gap = statistics.fmean(tail) - statistics.fmean(ref)
        summary[label] = {"final_mean": statistics.fmean(tail), "gap_to_fp32": gap,
                          "within_noise": abs(gap) <= noise}
        print(f"{label:45s} final {statistics.fmean(tail):.4f}  vs fp32 {gap:+.4f}  (fp32 seed spread {noise:.4f})")
    if args.json:
        args.json.write_text(json.dumps({"curves": out, "summary": summary, "noise": noise}, indent=2))


if __name__ == "__main__":
    main()
