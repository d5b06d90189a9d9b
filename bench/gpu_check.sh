#!/usr/bin/env bash
# One GPU check of slimtune, ready to run in one call on one H100/H200 (<= 8 minutes, no network), everything under
# one results folder. The most valuable results come first (correctness, the dispatch verdicts, the 8B bench);
# every step runs under its time cap, and each result is written as it is made (a step cut off keeps its rows;
# the bench steps log every training step, sweep length and max-context trial, unbuffered, into <step>.log):
#   1 env          GPU, driver, python/torch/triton/transformers/peft/bitsandbytes versions
#   2 setup        slimtune (+ slimtune.kernels) and the carried wheels for this Python into a private site dir
#   3 correctness  bf16 vs float64 at Llama-3.1-8B shapes: every kernel (forward + every gradient) per backend,
#                  Triton first, and the fused 1-layer model (loss + every adapter gradient)   -> correctness.jsonl
#   4 dispatch     what train.kernels: auto measures and keeps, per op and shape (dispatch.txt, dispatch.json,
#                  the verdicts the later steps reuse)
#   5 bench        slimtune bench, Llama-3.1-8B, QLoRA r16, seq 2048 x batch 2: slimtune vs HF + PEFT + bnb, both
#                  over one random base drawn and quantized on the GPU
#   6 microbench   forward+backward of each projection per backend (torch, dequant, triton), M = 1k/4k/16k
#   7 maxctx       the longest sequence that trains one step under 24 GiB (slimtune and the baseline), searched
#                  from 4k up to 32k tokens
#
# usage: bash bench/gpu_check.sh [--dry-run] [--out DIR] [--pack FILE.tar.gz]
#   --dry-run  here (CPU): list the steps, check the inputs (modules, the carried wheels against the device's
#              Python, configs), run the check code at tiny shapes in fp32 (check_kernels.py all --small), and
#              estimate each step's time on the device from what is timed here (bench/gpu/budget.py: imports,
#              the random base's build, Triton compiles, setup); fails if a step cannot fit its cap.
#   --pack     also write the whole results folder as one tarball (the device tool returns at most 8 files).
# Environment: GPU_CHECK_CAPS="bench=100,maxctx=90" overrides caps (seconds); GPU_CHECK_DEVICE_PYTHON (default
# 3.12, what KINDS.md saw) is the Python the dry run checks the wheels for; PYTHON the interpreter (python3).
# On this workplace's device machine (torch/triton/transformers/peft there, no bitsandbytes/pydantic/gguf):
#   here:  bash bench/gpu/prepare_wheels.sh       (once; ~23 MiB into bench/gpu/wheels/, git-ignored)
#   there: run(command="bash bench/gpu_check.sh --out /tmp/gpu --pack $OUT/gpu_check.tar.gz",
#              carry=["bench/gpu/wheels"], timeout_s=560); then unpack it under bench/results/.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/bench/gpu/wheels"
DEVICE_PYTHON="${GPU_CHECK_DEVICE_PYTHON:-3.12}"
BUDGET=480
DRY=0
OUT=""
PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --pack) PACK="$2"; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
cd "$ROOT"

# step name, time cap (s), command (run in the results folder R, so that `slimtune` is the one setup installed
# with slimtune.kernels, not the checkout's own folder; ROOT = the checkout). In order of value.
BENCH="\$PY -m slimtune.cli bench --model-config Llama-3.1-8B --device cuda"  # not --quiet: its log is the partial result
STEPS=(
  "env|15|nvidia-smi; \$PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; \$PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|bitsandbytes|accelerate|pydantic) '"
  "setup|15|setup_site"
  "correctness|90|SLIMTUNE_DISPATCH_CACHE=off \$PY \$ROOT/bench/gpu/check_kernels.py correctness --out \$R"
  "dispatch|35|\$PY \$ROOT/bench/gpu/check_kernels.py dispatch --out \$R"
  "bench|130|SLIMTUNE_DISPATCH_CACHE=\$R/dispatch.json $BENCH --seq-len 2048 --batch 2 --rank 16 --steps 4 --warmup 1 --out \$R/bench-llama-3.1-8b"
  "microbench|50|\$PY \$ROOT/bench/gpu/check_kernels.py microbench --out \$R"
  "maxctx|145|SLIMTUNE_DISPATCH_CACHE=\$R/dispatch.json $BENCH --max-context --mem-cap-gib 24 --seq-len 4096 --max-context-limit 32768 --seq-lens 4096 --batch 1 --rank 16 --steps 2 --warmup 1 --out \$R/maxctx-24gib"
)
if [ -n "${GPU_CHECK_CAPS:-}" ]; then  # name=seconds,... (a shorter call, or a test of the budget check)
  for kv in ${GPU_CHECK_CAPS//,/ }; do
    for i in "${!STEPS[@]}"; do
      IFS='|' read -r name cap cmd <<< "${STEPS[$i]}"
      [ "$name" = "${kv%%=*}" ] && STEPS[$i]="$name|${kv#*=}|$cmd"
    done
  done
fi

SITE="${SLIMTUNE_SITE:-/tmp/slimtune_site}"
setup_site() {
  # slimtune from this checkout (kernels/ becomes slimtune/kernels, as pyproject.toml installs it) and, for each
  # module this Python lacks, the carried wheel whose tags it supports (bench/gpu/carried.py); a wheel is a zip,
  # unpacked as is (no pip, no network).
  mkdir -p "$SITE"
  rm -rf "$SITE/slimtune"
  cp -r "$ROOT/slimtune" "$SITE/slimtune" && cp -r "$ROOT/kernels" "$SITE/slimtune/kernels" || return 1
  local picked
  picked=$($PY "$ROOT/bench/gpu/carried.py" pick "$WHEELS") || return 1
  for whl in $picked; do
    $PY -m zipfile -e "$whl" "$SITE" && echo "unpacked $(basename "$whl")" || return 1
  done
  PYTHONPATH="$SITE" $PY -c "import bitsandbytes, pydantic, slimtune.kernels, slimtune.cli; print('bitsandbytes', bitsandbytes.__version__)"
}

inputs_ok=1
check_inputs() {
  echo "== inputs"
  # one interpreter for every module (importing torch/transformers once); the device lacks the carried ones
  $PY - <<'PY' || inputs_ok=0
import importlib, sys
need = ["torch", "transformers", "peft", "accelerate", "typer", "rich", "yaml", "safetensors"]
carried = ["bitsandbytes", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gguf"]
bad = 0
for mod in need + ["triton"] + carried:
    try:
        importlib.import_module(mod)
        print(f"  ok       {mod}")
    except Exception:
        if mod == "triton":
            print("  MISSING  triton: the triton candidate is skipped (torch and dequant still run)")
        else:
            print(f"  MISSING  {mod}")
            bad = 1
from slimtune.bench.bench_config import resolve_bench_config
c = resolve_bench_config("Llama-3.1-8B")
print("  ok       Llama-3.1-8B config:", c.num_hidden_layers, "layers, hidden", c.hidden_size)
sys.exit(bad)
PY
  if [ -d "$WHEELS" ]; then
    if $PY "$ROOT/bench/gpu/carried.py" cover "$WHEELS" "$DEVICE_PYTHON"; then
      echo "  ok       carried wheels for the device's Python $DEVICE_PYTHON ($(du -sh "$WHEELS" | cut -f1) in bench/gpu/wheels)"
    else
      echo "  FAILED   carried wheels do not cover Python $DEVICE_PYTHON: bash bench/gpu/prepare_wheels.sh"; inputs_ok=0
    fi
  else
    echo "  WARNING  bench/gpu/wheels/ not prepared here: bash bench/gpu/prepare_wheels.sh before the device run"
  fi
}

time_setup() {
  # setup_site into a scratch site (it must work here too), then the device's file work timed (wall seconds into
  # $OUT/dry-run/setup_seconds): the copy of slimtune and the wheels it would unpack for its Python
  local scratch t0
  scratch="$(mktemp -d)"
  SITE="$scratch/site" setup_site > "$OUT/dry-run/setup.log" 2>&1 || { echo "  FAILED   setup: see $OUT/dry-run/setup.log"; inputs_ok=0; }
  t0=$(date +%s%N)
  cp -r "$ROOT/slimtune" "$scratch/copy" && cp -r "$ROOT/kernels" "$scratch/copy/kernels"
  if [ -d "$WHEELS" ]; then
    for whl in $($PY "$ROOT/bench/gpu/carried.py" pick "$WHEELS" "$DEVICE_PYTHON"); do
      $PY -m zipfile -e "$whl" "$scratch/unpacked" || inputs_ok=0
    done
  fi
  echo "$(date +%s%N) $t0" | awk '{printf "%.2f\n", ($1 - $2) / 1e9}' > "$OUT/dry-run/setup_seconds"
  rm -rf "$scratch"
}

echo "results: $OUT"
if [ "$DRY" = 1 ]; then
  mkdir -p "$OUT/dry-run"
  echo "== steps (dry run: nothing runs on a GPU)"
  : > "$OUT/dry-run/steps.txt"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap cmd <<< "$s"
    printf '  %-12s <= %3s s  %s\n' "$name" "$cap" "$cmd"
    echo "$s" >> "$OUT/dry-run/steps.txt"
  done
  check_inputs
  echo "== the check code at tiny shapes on CPU (fp32; Triton is measured only on a GPU)"
  if env -u TRITON_INTERPRET $PY "$ROOT/bench/gpu/check_kernels.py" all --small --out "$OUT/dry-run" > "$OUT/dry-run.log" 2>&1; then
    echo "  ok       correctness, microbench, dispatch (--small): $(grep -c '| True |' "$OUT/dry-run.log") checks passed"
  else
    echo "  FAILED   check_kernels.py all --small: see $OUT/dry-run.log"; tail -5 "$OUT/dry-run.log"; inputs_ok=0
  fi
  time_setup
  env -u TRITON_INTERPRET $PY "$ROOT/bench/gpu/budget.py" --steps "$OUT/dry-run/steps.txt" --budget "$BUDGET" \
    --setup-seconds "$(cat "$OUT/dry-run/setup_seconds")" --json "$OUT/dry-run/budget.json" \
    2> "$OUT/dry-run/budget.log" || { inputs_ok=0; tail -3 "$OUT/dry-run/budget.log"; }
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
    timeout --kill-after=5 "$cap" bash -c "$(declare -f setup_site); PY='$PY' ROOT='$ROOT' WHEELS='$WHEELS' SITE='$SITE' setup_site" > "$R/$name.log" 2>&1; rc=$?
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$cap" bash -c "PY='$PY'; R='$R'; ROOT='$ROOT'; $cmd" > "$R/$name.log" 2>&1; rc=$?
  fi
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$R/summary.txt"
  tail -25 "$R/$name.log"
  [ $rc -eq 0 ] || status=1
done
echo "results in $R (summary.txt, *.jsonl, *.md, *.json, bench-*/)"
if [ -n "$PACK" ]; then
  tar -czf "$PACK" -C "$(dirname "$R")" "$(basename "$R")" && echo "packed into $PACK"
fi
exit $status
