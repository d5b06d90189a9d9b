#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels bench/gpu_check.sh needs on a GPU machine that has torch,
# triton, transformers and peft but not bitsandbytes, pydantic or gguf (this workplace's H200 image, 2026-11).
# They land in bench/gpu/wheels/ (git-ignored); pass that folder in the device call's `carry`.
# bitsandbytes' wheel holds one CUDA library per toolkit (41 MiB); only the CPU one and those for CUDA 12.8-13.x
# are kept, so the folder (with pydantic-core for CPython 3.10-3.13) stays ~20 MiB under the device tool's 64 MiB
# transfer limit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/wheels"
py="${PYTHON:-python3}"
PYTHONS="${GPU_CHECK_PYTHONS:-3.10 3.11 3.12 3.13}"  # the device's Python, whichever it is
mkdir -p "$dest"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dest" bitsandbytes==0.50.2 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0
# pydantic-core is compiled per CPython version (cp312-cp312-...): one wheel for each Python the device may have
# (KINDS.md saw 3.12.3); setup picks the one this interpreter supports, and the dry run checks the coverage.
for v in $PYTHONS; do
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    "${plat[@]}" -d "$dest" pydantic-core==2.50.5
done
# slim bitsandbytes: drop the CUDA 11.8-12.6, ROCm and XPU libraries (a wheel is a zip; gpu_check.sh unzips it)
whl=$(ls "$dest"/bitsandbytes-*.whl)
"$py" - "$whl" <<'PY'
import re, sys, zipfile
src = sys.argv[1]
keep = re.compile(r"libbitsandbytes_(cpu|cuda12[89]|cuda13\d)\.so$")
out = src.replace(".whl", ".slim.zip")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.endswith(".so") and not keep.search(item.filename):
            continue
        zout.writestr(item, zin.read(item.filename))
print("kept", out)
PY
rm -f "$whl"
du -sh "$dest"
