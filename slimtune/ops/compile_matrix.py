"""The compile matrix: every Triton kernel variant a QLoRA run on Llama-3.1-8B / Qwen2.5-3B launches, compiled
ahead of time for sm_80 / sm_86 / sm_89 / sm_90 with the installed triton, on a machine without a GPU.

Two sources of variants:

* the adapted-projection GEMMs (kernels/qlora_linear.py) and the NF4 dequant kernel: the real ops
  (`lora_qkv`, `lora_projection`, `lora_mlp`) run forward and backward with ``backend="triton"`` on CPU tensors at
  the models' real widths (bf16, NF4 with double quant, LoRA and DoRA r16, Qwen's q/k/v bias, an unadapted k) while
  `slimtune.kernels.aot.capture()` records each launch instead of running it, so the blocks, warps, stages and
  argument specialisations are exactly the launchers' own;
* the other kernels (rms_norm, rope, the MLP's elementwise GLU, the loss rows): the ``COMPILE_VARIANTS`` registry
  each kernel module exposes, restricted to what these two models use (``--all``: the whole registry).

Compilation runs in one child process (TRITON_INTERPRET must be off before triton is imported), one kernel at a
time. `slimtune kernels compile` prints the table; tests/kernels/test_compile_matrix.py fails on a compile error or
on shared memory above an arch's per-block limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable

import torch

from slimtune.errors import SlimtuneError
from slimtune.ops import dispatch
from slimtune.ops.lora_linear import LoRAProjection, lora_projection
from slimtune.ops.lora_mlp import lora_mlp
from slimtune.ops.lora_qkv import lora_qkv
from slimtune.ops.nf4 import NF4Weight

__all__ = ["ARCH_NAMES", "MODELS", "compile_matrix", "main"]

ARCH_NAMES = ("sm_80", "sm_86", "sm_89", "sm_90")
MODELS = {  # hidden, intermediate, q heads, kv heads, head dim, q/k/v bias
    "llama-3.1-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, bias=False),
    "qwen2.5-3b": dict(hidden=2048, inter=11008, heads=16, kv_heads=2, head_dim=128, bias=True),
}
TOKENS = 64  # >= the GEMM's BLOCK_M: the launch is the one of a 4k-token step (M only enters as a runtime int)
RANK = 16

# registry entries these two models use (bf16 activations and weights, SwiGLU, no logit softcap)
_USED: dict[str, Callable[[str], bool]] = {
    "rms_norm": lambda n: any(f"N={h},bf16/bf16" in n for h in (4096, 2048)),
    "rope": lambda n: any(f"[{h},bf16/" in n for h in ("32/8x128", "16/2x128")),
    "lora_mlp": lambda n: "bf16,silu" in n,
    "linear_ce": lambda n: "bf16,softcap=0" in n,
    "nf4": lambda n: True,  # the "dequant" backend's writer where bitsandbytes is missing
}


def _fake_nf4(out_f: int, in_f: int, storage: torch.Tensor):
    """An NF4 double-quant weight of the real shape whose bytes are never read (the launches are only captured)."""
    n = out_f * in_f
    return NF4Weight(
        packed=storage[: n // 2], code=torch.zeros(16), absmax=storage[: n // 64], blocksize=64,
        shape=(out_f, in_f), dtype=torch.bfloat16, quant_type="nf4", absmax_code=torch.zeros(256),
        absmax_scale=torch.zeros(n // 64 // 256 + 1), absmax_blocksize=256, absmax_offset=torch.zeros(1),
    )  # fmt: skip


def _proj(out_f: int, in_f: int, storage, *, lora=True, dora=False, bias=False):
    p = lambda *s: torch.zeros(*s, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return LoRAProjection(
        base=_fake_nf4(out_f, in_f, storage), bias=torch.zeros(out_f, dtype=torch.bfloat16) if bias else None,
        lora_A=p(RANK, in_f) if lora else None, lora_B=p(out_f, RANK) if lora else None, scale=2.0,
        magnitude=p(out_f) if (dora and lora) else None,
    )  # fmt: skip


def _scenarios(name: str, cfg: dict) -> Iterable[tuple[str, Callable[[], None]]]:
    h, i, hd = cfg["hidden"], cfg["inter"], cfg["head_dim"]
    q_out, kv_out = cfg["heads"] * hd, cfg["kv_heads"] * hd
    storage = torch.empty(i * h // 2, dtype=torch.uint8)

    def step(fn):
        x = torch.zeros(TOKENS, h, dtype=torch.bfloat16, requires_grad=True)
        outs = fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])

    for dora in (False, True):
        tag = f"{name},{'dora' if dora else 'lora'}"
        qkv = [_proj(o, h, storage, dora=dora, bias=cfg["bias"]) for o in (q_out, kv_out, kv_out)]
        yield f"{tag},qkv", lambda qkv=qkv: step(lambda x: lora_qkv(x, q=qkv[0], k=qkv[1], v=qkv[2], backend="triton"))
        o = _proj(h, q_out, storage, dora=dora)
        yield f"{tag},o", lambda o=o: step(lambda x: lora_projection(x, o, backend="triton"))
        g, u, d = _proj(i, h, storage, dora=dora), _proj(i, h, storage, dora=dora), _proj(h, i, storage, dora=dora)
        yield f"{tag},mlp", lambda g=g, u=u, d=d: step(lambda x: lora_mlp(x, gate=g, up=u, down=d, backend="triton"))
    q, k, v = (_proj(o, h, storage, lora=o != kv_out or j == 2, bias=cfg["bias"])
               for j, o in enumerate((q_out, kv_out, kv_out)))  # fmt: skip
    yield f"{name},q+v only", lambda: step(lambda x: lora_qkv(x, q=q, k=k, v=v, backend="triton"))


def _label(launch) -> str:
    kw = launch.kwargs
    if launch.fn.__name__ == "_qlora_gemm_kernel":
        flags = [f.lower() for f in ("A_KSCALE", "HAS_LORA", "HAS_COLSCALE", "HAS_BIAS", "ACCUMULATE", "DMAG")
                 if kw.get(f)]  # fmt: skip
        w = "nf4dq" if kw.get("NESTED") else ("nf4" if kw.get("W_4BIT") else "dense")
        tiles = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
        names = launch.fn.arg_names
        dx = launch.args[names.index("stride_wn")] == 1  # dX = dY W walks W along its rows
        way = "dx" if dx else ("dmag" if kw.get("DMAG") else "fwd")
        flags = [f for f in flags if f != "dmag"]
        return f"qlora_gemm[{way},{w},{'+'.join(flags) or 'base'},{tiles},r{kw['BLOCK_R']}]"
    if launch.fn.__name__ == "_row_norm_sq_kernel":
        return f"row_norm_sq[{'nf4dq' if kw.get('NESTED') else 'nf4'},{kw['BLOCK_N']}x{kw['BLOCK_K']}]"
    return launch.fn.__name__


def _captured(models: Iterable[str]) -> list:
    """The unique GEMM-family launches of the scenarios (K's kernels come from their registries)."""
    aot = dispatch.triton_module("aot")
    unique: dict[tuple, object] = {}
    with dispatch.triton_on_cpu():
        for model in models:
            for where, run in _scenarios(model, MODELS[model]):
                with aot.capture() as launches:
                    run()
                for launch in launches:
                    if launch.fn.__module__.rsplit(".", 1)[-1] != "qlora_linear":
                        continue
                    key = aot.launch_key(launch)
                    first = unique.setdefault(key, launch)
                    first.label = _label(first)
                    first.where.append(where)
    return list(unique.values())


def _registry(all_variants: bool) -> list:
    aot = dispatch.triton_module("aot")
    out = []
    for module, used in _USED.items():
        mod = dispatch.triton_module(module)
        for spec in getattr(mod, "COMPILE_VARIANTS", []):
            if all_variants or used(spec["name"]):
                out.append(aot.spec_launch(getattr(mod, spec["kernel"]), spec))
    return out


def _worker(archs: list[str], models: list[str], all_variants: bool) -> list[dict]:
    aot = dispatch.triton_module("aot")
    launches = _captured(models) + _registry(all_variants)
    total, rows = len(launches) * len(archs), []
    for launch in launches:
        for arch in archs:
            rows.append(aot.compile_launch(launch, arch) | {"used_by": sorted(set(launch.where))[:4]})
            print(f"progress {len(rows)}/{total} {rows[-1]['kernel']} {arch}", file=sys.stderr, flush=True)
    return rows


def compile_matrix(
    archs: Iterable[str] = ARCH_NAMES, *, models: Iterable[str] = tuple(MODELS), all_variants: bool = False,
    timeout: float = 1800, progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """Rows {kernel, arch, ok, registers, spill_bytes, shared_bytes, shared_limit_kib, error, ...}, compiled in one
    child process (TRITON_INTERPRET off there)."""
    archs, models = list(archs), list(models)
    bad = [a for a in archs if a not in ARCH_NAMES] + [m for m in models if m not in MODELS]
    if bad:
        raise SlimtuneError(f"compile matrix: unknown arch/model {', '.join(bad)} (archs: {', '.join(ARCH_NAMES)})")
    if not dispatch.triton_available():
        raise SlimtuneError("compile matrix: triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "slimtune.ops.compile_matrix", "--worker", "--arch", ",".join(archs),
               "--models", ",".join(models), "--out", out] + (["--all"] if all_variants else [])  # fmt: skip
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env) as proc:
            last = ""
            for line in proc.stderr:
                m = re.match(r"progress (\d+)/(\d+) (.*)", line)
                if m and progress is not None:
                    progress(int(m[1]), int(m[2]), m[3])
                elif line.strip():
                    last = line.strip()
            proc.wait(timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise SlimtuneError(f"compile matrix worker failed: {last or proc.returncode}")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--arch", default=",".join(ARCH_NAMES))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if not a.worker:
        print(json.dumps(compile_matrix(a.arch.split(","), models=a.models.split(","), all_variants=a.all)))
        return 0
    if dispatch.interpreter_on():
        raise SystemExit("the compile worker needs TRITON_INTERPRET unset")
    rows = _worker(a.arch.split(","), a.models.split(","), a.all)
    with open(a.out, "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
