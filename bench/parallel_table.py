"""Markdown tables from the `slimtune estimate --json --nproc N` files bench/parallel_estimate.sh wrote (nothing computed here)."""
import json, sys
from pathlib import Path

from slimtune.bench.parallel import COMPONENTS, LABELS

GiB = 1024**3
d = Path(sys.argv[1])
for model in ("8b", "70b"):
    runs = {(m, n): json.loads((d / f"{model}-{m}-{n}.json").read_text()) for m in ("ddp", "fsdp") for n in (1, 2, 4, 8)}
    first = runs["ddp", 1]
    inp = first["inputs"]
    print(f"\n### {first['model']} — {inp['quant']} {inp['kind']} r{inp['rank']}, seq {inp['seq_len']} x micro_batch "
          f"{inp['micro_batch']}, grad_accum {first['per_rank']['grad_accum']}, checkpointing "
          f"{inp['grad_checkpointing']}, {inp['optimizer']}, {'fused' if first['fused'] else 'HF+PEFT'} (GiB per rank)\n")
    cols = [(m, n) for m in ("ddp", "fsdp") for n in (1, 2, 4, 8)]
    print("| component | " + " | ".join(f"{m} {n}" for m, n in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for k in COMPONENTS:
        vals = [runs[c]["per_rank"]["components_bytes"][k] for c in cols]
        if any(vals):
            print(f"| {LABELS[k]} | " + " | ".join(f"{v / GiB:.3f}" for v in vals) + " |")
    print("| **total per rank** | " + " | ".join(f"**{runs[c]['per_rank']['total_bytes'] / GiB:.2f}**" for c in cols) + " |")
    print("| on 24 GiB | " + " | ".join("fits" if runs[c]["per_rank"]["fits"] else "no" for c in cols) + " |")
    print("| longest seq_len on 24 GiB | " + " | ".join(f"{runs[c]['per_rank']['max_seq_len']:,}" for c in cols) + " |")
    print("| global batch (sequences) | " + " | ".join(str(runs[c]["global_batch_sequences"]) for c in cols) + " |")
    host = {k: v for k, v in first["host_bytes"].items()}
    if host:
        print("\nHost memory per rank (not in the GPU total): " +
              "; ".join(f"{k} {v / GiB:.2f} GiB" for k, v in host.items()) + ".")
    notes = runs["fsdp", 8]["notes"] + runs["fsdp", 8]["per_rank"]["notes"]
    for note in notes:
        print(f"- {note}")
