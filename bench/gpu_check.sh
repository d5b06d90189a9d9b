#!/usr/bin/env bash
# One GPU check of slimtune, ready to run in one call on one H100/H200 (<= 8 minutes, no network), everything under
# one results folder:
#   1 env          GPU, driver, python/torch/triton/transformers/peft/bitsandbytes versions
#   2 setup        slimtune (+ slimtune.kernels) and the carried wheels (bench/gpu/wheels/) into a private site dir
#   3 correctness  bf16 vs float64 at Llama-3.1-8B shapes: every kernel (forward + every gradient) per backend,
#                  and the fused 1-layer model (loss + every adapter gradient)
#   4 microbench   forward+backward of each projection per backend (torch, dequant, triton), M = 1k/4k/16k
#   5 dispatch     what train.kernels: auto measures and keeps, per op and shape (cache file in the results)
#   6 bench        slimtune bench, Llama-3.1-8B, QLoRA r16, seq 2048 x batch 2: slimtune vs HF + PEFT + bnb
#   7 maxctx       the longest sequence that trains under 24 GiB (slimtune and the baseline)
#
# usage: bash bench/gpu_check.sh [--dry-run] [--out DIR] [--pack FILE.tar.gz]
#   --dry-run  list the steps and check the inputs here (CPU): modules, wheels, configs, and the check code itself
#              at tiny shapes in fp32 (bench/gpu/check_kernels.py --small).
#   --pack     also write the whole results folder as one tarball (the device tool returns at most 8 files).
# On this workplace's device machine (torch/triton/transformers/peft there, no bitsandbytes/pydantic/gguf):
#   here:  bash bench/gpu/prepare_wheels.sh       (once; ~17 MiB into bench/gpu/wheels/, git-ignored)
#   there: run(command="bash bench/gpu_check.sh --out /tmp/gpu --pack $OUT/gpu_check.tar.gz",
#              carry=["bench/gpu/wheels"], timeout_s=560); then unpack it under bench/results/.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
OUT=""
PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --pack) PACK="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
cd "$ROOT"

# step name, time cap (s), command (run in the results folder R, so that `slimtune` is the one setup installed
# with slimtune.kernels, not the checkout's own folder; ROOT = the checkout)
STEPS=(
  "env|10|nvidia-smi; \$PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; \$PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|bitsandbytes|accelerate|pydantic) '"
  "setup|30|setup_site"
  "correctness|90|\$PY \$ROOT/bench/gpu/check_kernels.py correctness --out \$R"
  "microbench|100|\$PY \$ROOT/bench/gpu/check_kernels.py microbench --out \$R"
  "dispatch|45|\$PY \$ROOT/bench/gpu/check_kernels.py dispatch --out \$R"
  "bench|135|\$PY -m slimtune.cli bench --model-config Llama-3.1-8B --device cuda --seq-len 2048 --batch 2 --rank 16 --steps 4 --warmup 1 --quiet --out \$R/bench-llama-3.1-8b"
  "maxctx|70|\$PY -m slimtune.cli bench --model-config Llama-3.1-8B --device cuda --max-context --mem-cap-gib 24 --max-context-limit 65536 --batch 1 --steps 2 --warmup 1 --quiet --out \$R/maxctx-24gib"
)

SITE="${SLIMTUNE_SITE:-/tmp/slimtune_site}"
setup_site() {
  # slimtune from this checkout (kernels/ becomes slimtune/kernels, as pyproject.toml installs it) and any wheel of
  # bench/gpu/wheels/ whose module is missing; a wheel is a zip, unpacked as is (no pip, no network).
  mkdir -p "$SITE"
  rm -rf "$SITE/slimtune"
  cp -r "$ROOT/slimtune" "$SITE/slimtune" && cp -r "$ROOT/kernels" "$SITE/slimtune/kernels" || return 1
  for whl in "$ROOT"/bench/gpu/wheels/*.whl "$ROOT"/bench/gpu/wheels/*.zip; do
    [ -e "$whl" ] || continue
    mod=$(basename "$whl" | sed -E 's/-[0-9].*//; s/-/_/g' | tr 'A-Z' 'a-z')
    if ! PYTHONPATH="$SITE" $PY -c "import $mod" 2>/dev/null; then
      $PY -m zipfile -e "$whl" "$SITE" && echo "unpacked $(basename "$whl")"
    fi
  done
  PYTHONPATH="$SITE" $PY -c "import bitsandbytes, pydantic, slimtune.kernels, slimtune.cli; print('bitsandbytes', bitsandbytes.__version__)"
}

inputs_ok=1
check_inputs() {
  echo "== inputs"
  # one interpreter for every module (importing torch/transformers once); a missing one must have a carried wheel
  $PY - "$ROOT/bench/gpu/wheels" <<'PY' || inputs_ok=0
import importlib, pathlib, sys
wheels = pathlib.Path(sys.argv[1])
need = ["torch", "transformers", "peft", "accelerate", "typer", "rich", "yaml", "safetensors"]
carried = ["bitsandbytes", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gguf"]
bad = 0
for mod in need + ["triton"] + carried:
    try:
        importlib.import_module(mod)
        print(f"  ok       {mod}")
    except Exception:
        if mod in carried and any(wheels.glob(f"{mod}-*")):
            print(f"  wheel    {mod} (bench/gpu/wheels/)")
        elif mod == "triton":
            print("  MISSING  triton: the triton candidate is skipped (torch and dequant still run)")
        else:
            hint = ": run bash bench/gpu/prepare_wheels.sh here, carry bench/gpu/wheels" if mod in carried else ""
            print(f"  MISSING  {mod}{hint}")
            bad = 1
from slimtune.bench.bench_config import resolve_bench_config
c = resolve_bench_config("Llama-3.1-8B")
print("  ok       Llama-3.1-8B config:", c.num_hidden_layers, "layers, hidden", c.hidden_size)
sys.exit(bad)
PY
  total=0
  for s in "${STEPS[@]}"; do total=$((total + $(echo "$s" | cut -d'|' -f2))); done
  echo "  time caps: ${total} s in all (budget 480)"
  [ "$total" -le 480 ] || inputs_ok=0
}

echo "results: $OUT"
if [ "$DRY" = 1 ]; then
  echo "== steps (dry run: nothing runs on a GPU)"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap cmd <<< "$s"
    printf '  %-12s <= %3s s  %s\n' "$name" "$cap" "$cmd"
  done
  check_inputs
  echo "== the check code at tiny shapes on CPU (fp32; Triton is measured only on a GPU)"
  if env -u TRITON_INTERPRET $PY "$ROOT/bench/gpu/check_kernels.py" all --small --out "$OUT/dry-run" > "$OUT/dry-run.log" 2>&1; then
    echo "  ok       correctness, microbench, dispatch (--small): $(grep -c '| True |' "$OUT/dry-run.log") checks passed"
  else
    echo "  FAILED   check_kernels.py all --small: see $OUT/dry-run.log"; tail -5 "$OUT/dry-run.log"; inputs_ok=0
  fi
  [ "$inputs_ok" = 1 ] && echo "dry run: OK" && exit 0
  echo "dry run: FAILED"; exit 1
fi

status=0
R="$(cd "$OUT" && pwd)"
cd "$R"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name cap cmd <<< "$s"
  echo "== $name (<= ${cap} s)"
  t0=$(date +%s)
  if [ "$name" = setup ]; then
    setup_site > "$R/$name.log" 2>&1; rc=$?
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    timeout --kill-after=10 "$cap" bash -c "PY='$PY'; R='$R'; ROOT='$ROOT'; $cmd" > "$R/$name.log" 2>&1; rc=$?
  fi
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$R/summary.txt"
  tail -25 "$R/$name.log"
  [ $rc -eq 0 ] || status=1
done
echo "results in $R (summary.txt, *.md, *.json, bench-*/)"
if [ -n "$PACK" ]; then
  tar -czf "$PACK" -C "$(dirname "$R")" "$(basename "$R")" && echo "packed into $PACK"
fi
exit $status
