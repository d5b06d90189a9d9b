#!/usr/bin/env bash
# Per-rank tables of bench/results/parallel-estimate-2026-12-01.md: one `slimtune estimate --json` per cell.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/parallel_estimate}; mkdir -p "$OUT"
R8=recipes/llama31_8b_floor.yaml;         S8=()                              # as shipped (8-bit AdamW)
R70=recipes/loram_llama31_70b_gsm8k.yaml; S70=(--set loram=null)             # the unpruned 70B
for mode in ddp fsdp; do for n in 1 2 4 8; do
  slimtune estimate $R8 "${S8[@]}" --set train.distributed=$mode --nproc $n --json > "$OUT/8b-$mode-$n.json"
  slimtune estimate $R70 "${S70[@]}" --set train.distributed=$mode --nproc $n --json > "$OUT/70b-$mode-$n.json"
done; done
python bench/parallel_table.py "$OUT"
