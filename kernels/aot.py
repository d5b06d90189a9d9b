"""Ahead-of-time compilation of the launches a run makes, for GPUs this machine does not have (no driver needed).

`capture()` replaces `JITFunction.run` while active: a launch records (kernel, args, kwargs) and returns without
running, so the real launchers can be driven on CPU tensors at real shapes and every kernel variant they would
launch (constexprs, num_warps/num_stages, and the integer/pointer specialisations Triton derives from the arguments)
is collected. `compile_launch(launch, arch)` then specialises exactly as the JIT would on that GPU and compiles with
`triton.compile` for `GPUTarget("cuda", arch, 32)`; ptxas ships with triton's nvidia backend. Registers and local
memory (spills) are read from the cubin with the bundled cuobjdump; shared memory from the kernel metadata.

Written against triton 3.9 (`JITFunction.binder` / `_pack_args` are internal): the compile-matrix test runs it on
the installed triton, so a version that changes them fails there, not on a user's GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

__all__ = ["ARCHS", "Launch", "capture", "compile_launch", "launch_key", "spec_launch"]

# Maximum shared memory per block (opt-in), KiB: A100/H100 163/227; GA10x (RTX 30xx, A10, A40) and AD10x (RTX 40xx,
# L4, L40) 99 (CUDA C programming guide, "Features and Technical Specifications").
ARCHS = {"sm_80": (80, 163), "sm_86": (86, 99), "sm_89": (89, 99), "sm_90": (90, 227)}


@dataclass
class Launch:
    """One captured kernel launch (the tensors are the caller's, on any device)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    label: str = ""
    where: list[str] = field(default_factory=list)  # which scenarios launched it
    spec: dict | None = None  # a registry entry (`spec_launch`) instead of captured arguments


def spec_launch(fn: JITFunction, spec: dict) -> Launch:
    """A launch described by a kernel module's COMPILE_VARIANTS entry: name, kernel, signature (runtime argument
    types such as "*bf16", "i32", "fp32"), constexprs, num_warps, num_stages. No alignment attributes are assumed."""
    return Launch(fn, (), {}, label=spec["name"], where=["registry"], spec=spec)


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record every `kernel[grid](...)` launch instead of running it (outputs stay as allocated)."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _specialise(launch: Launch, arch: int):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    if launch.spec is not None:
        spec = launch.spec
        cx = spec.get("constexprs", {})
        signature = {n: ("constexpr" if n in cx else spec["signature"][n]) for n in launch.fn.arg_names}
        opts = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2)}
        options = backend.parse_options(opts)
        return target, signature, {(launch.fn.arg_names.index(n),): v for n, v in cx.items()}, {}, options
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def launch_key(launch: Launch) -> tuple:
    """What makes two launches the same compiled kernel: name, signature, constexprs, attributes, options."""
    _, signature, constexprs, attrs, options = _specialise(launch, 80)
    opts = (options.num_warps, options.num_stages)
    return (launch.fn.__name__, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))),
            tuple(sorted(map(str, attrs.items()))), opts)  # fmt: skip


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def compile_launch(launch: Launch, arch_name: str) -> dict:
    """Compile one captured launch for `arch_name` ("sm_80" ...): registers, spills, shared memory, limit check."""
    arch, limit_kib = ARCHS[arch_name]
    row = {"kernel": launch.label or launch.fn.__name__, "arch": arch_name, "shared_limit_kib": limit_kib}
    try:
        target, signature, constexprs, attrs, options = _specialise(launch, arch)
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - a compile error is a result of the matrix
        first = (str(exc).strip().splitlines() or [""])[0]
        return row | {"ok": False, "error": f"{type(exc).__name__}: {first[:300]}"}
    shared = int(compiled.metadata.shared)
    row |= {
        "registers": usage.get("REG", -1),
        "spill_bytes": usage.get("LOCAL", 0),  # local memory per thread: spills (the kernels have no local arrays)
        "shared_bytes": shared,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
    }
    ok = shared <= limit_kib * 1024
    return row | {"ok": ok, "error": "" if ok else f"shared memory {shared / 1024:.1f} KiB > {limit_kib} KiB"}
