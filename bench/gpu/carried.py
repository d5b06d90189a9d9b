"""The wheels gpu_check.sh carries to the device (bench/gpu/wheels/, filled by prepare_wheels.sh): which one suits
the running Python, and whether the folder covers the device's Python.

    python bench/gpu/carried.py pick DIR              the wheels to unpack here: one per distribution whose module
                                                      is missing, its tags supported by this interpreter
    python bench/gpu/carried.py pick DIR 3.12         one per needed distribution for that Python, all of them
                                                      (the dry run unpacks them to time the device's setup)
    python bench/gpu/carried.py cover DIR 3.12 [...]  every needed distribution has a wheel for each Python named
                                                      (exit 1 naming the gaps)

A compiled distribution (pydantic_core: cp312-cp312-manylinux...) needs one wheel per CPython minor version; the
others are py3-none (pure Python, or bitsandbytes' ctypes-loaded libraries) and suit any CPython 3.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: distribution (as wheel files spell it) -> module it provides; what the device image lacks (KINDS.md, 2026-11)
NEEDED = {
    "bitsandbytes": "bitsandbytes",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic_core",
    "annotated_types": "annotated_types",
    "typing_inspection": "typing_inspection",
    "gguf": "gguf",
}


def wheel_tags(path: Path) -> tuple[str, set[str], set[str]]:
    """(distribution, python tags, abi tags) from a wheel's file name (PEP 427; a .slim.zip is a trimmed wheel)."""
    stem = path.name.removesuffix(".whl").removesuffix(".slim.zip")
    parts = stem.split("-")
    dist = parts[0].lower().replace("-", "_").replace(".", "_")
    return dist, set(parts[-3].split(".")), set(parts[-2].split("."))


def suits(path: Path, version: tuple[int, int]) -> bool:
    """Whether a wheel installs on CPython ``version`` (x86-64 Linux assumed: the device's platform)."""
    _, pys, abis = wheel_tags(path)
    cp = f"cp{version[0]}{version[1]}"
    if cp in pys and (cp in abis or "abi3" in abis or "none" in abis):
        return True
    if "abi3" in abis:
        return any(p.startswith("cp3") and int(p[3:] or 0) <= version[1] for p in pys)
    return "none" in abis and bool(pys & {"py3", f"py{version[0]}{version[1]}", "py2.py3"})


def wheels(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.whl"), *folder.glob("*.slim.zip")])


def pick(folder: Path, version: tuple[int, int] | None = None) -> list[Path]:
    """One suitable wheel per needed distribution: for ``version``, all of them; else for this interpreter, those
    whose module it cannot import."""
    here = version or sys.version_info[:2]
    out = []
    for dist, module in NEEDED.items():
        if version is None and importlib.util.find_spec(module) is not None:
            continue
        found = [w for w in wheels(folder) if wheel_tags(w)[0] == dist and suits(w, here)]
        if not found:
            raise SystemExit(f"carried.py: no wheel of {dist} for Python {here[0]}.{here[1]} in {folder} "
                             f"(run bash bench/gpu/prepare_wheels.sh)")  # fmt: skip
        out.append(found[-1])
    return out


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def gaps(folder: Path, versions: list[tuple[int, int]]) -> list[str]:
    """'dist for 3.x' for every needed distribution without a wheel for a Python of ``versions``."""
    have = wheels(folder)
    return [f"{dist} for {v[0]}.{v[1]}" for dist in NEEDED for v in versions
            if not any(wheel_tags(w)[0] == dist and suits(w, v) for w in have)]  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) in (2, 3) and argv[0] == "pick":
        print("\n".join(str(p) for p in pick(Path(argv[1]), _version(argv[2]) if len(argv) == 3 else None)))
        return 0
    if len(argv) >= 3 and argv[0] == "cover":
        missing = gaps(Path(argv[1]), [_version(v) for v in argv[2:]])
        for line in missing:
            print(f"  MISSING  wheel of {line}")
        return 1 if missing else 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
