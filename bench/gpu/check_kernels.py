"""GPU check, kernel side: bf16 correctness against float64 at real shapes, micro-benchmarks per backend, and the
verdicts of the measured dispatch. Run by bench/gpu_check.sh (one results folder); `--small` runs the same code at
tiny shapes in fp32 on CPU (the dry run, and tests/bench/test_gpu_check.py).

    python bench/gpu/check_kernels.py correctness --out DIR [--small]
    python bench/gpu/check_kernels.py microbench  --out DIR [--small]
    python bench/gpu/check_kernels.py dispatch    --out DIR [--small]
    python bench/gpu/check_kernels.py all         --out DIR [--small]       (the three, one process)

Shapes are Llama-3.1-8B's (hidden 4096, intermediate 14336, 32/8 heads of 128, NF4 with double quant, LoRA and
DoRA r16). Every output and gradient is compared by ‖a − b‖ / ‖b‖ with the float64 formula; bf16 passes below
BF16_TOL. Micro-benchmarks time forward + backward with CUDA events (median of `triton.testing.do_bench`).

Every result is written as it is made: one JSON line per row appended (and flushed) to DIR/<what>.jsonl, the
dispatch verdicts rewritten to DIR/dispatch.txt after each op, so a step killed at its time cap keeps every row
made before; the Markdown / JSON tables are written at the end. Correctness runs the Triton kernels first, then the
dequant backend, then the torch reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from slimtune.ops import autotune, dispatch
from slimtune.ops.lora_linear import LoRAProjection, lora_linear_reference, lora_projection
from slimtune.ops.lora_mlp import lora_mlp, lora_mlp_reference
from slimtune.ops.lora_qkv import lora_qkv, lora_qkv_reference
from slimtune.ops.nf4 import quantize_4bit

BF16_TOL = 2e-2  # bf16 operands, fp32 accumulation: 1e-3 to 1e-2 expected (METHOD.md)
FP32_TOL = 2e-3
LLAMA = dict(hidden=4096, inter=14336, q=4096, kv=1024, heads=32, kv_heads=8, head_dim=128, vocab=128256)
SMALL = dict(hidden=64, inter=136, q=64, kv=32, heads=4, kv_heads=2, head_dim=16, vocab=300)


class Rows(list):
    """Result rows: each one appended to ``path`` as a JSON line (flushed) and printed as it is made."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        path.write_text("")

    def append(self, row: dict) -> None:
        super().append(row)
        line = json.dumps(row)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
        print(line, flush=True)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _backends(device: torch.device) -> list[str]:
    """The backends to check, the least proven first (Triton, then dequant, then the torch reference)."""
    out = ["dequant", "torch"]
    if dispatch.triton_available() and (device.type == "cuda" or dispatch.interpreter_on()):
        out.insert(0, "triton")
    return out


def _proj(out_f, in_f, *, device, dtype, dora=False, bias=False, seed=0, rank=16) -> LoRAProjection:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    p = lambda *s, std=0.02: (torch.randn(*s, generator=g) * std).to(device, dtype).requires_grad_()  # noqa: E731
    mag = (w.norm(dim=1) * (1 + 0.1 * torch.randn(out_f, generator=g))).to(device, dtype).requires_grad_()
    return LoRAProjection(
        base=quantize_4bit(w.to(device, dtype)), lora_A=p(rank, in_f, std=in_f**-0.5), lora_B=p(out_f, rank),
        scale=2.0, magnitude=mag if dora else None, bias=p(out_f) if bias else None,
    )  # fmt: skip


def _grads(outs, tensors, cot):
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return list(outs), list(torch.autograd.grad(outs, tensors, [c.to(o.dtype) for c, o in zip(cot, outs)]))


def _check(name, run, ref, tensors, cot, tol, rows, backend):
    """Compare run() (outputs) and its gradients with ref() in float64; append one row."""
    t0 = time.perf_counter()
    try:
        got_o, got_g = _grads(run(), tensors, cot)
        want_o, want_g = _grads(ref(), tensors, cot)
        errs = [_rel(a, b) for a, b in zip(got_o + got_g, want_o + want_g)]
        worst = max(errs)
        rows.append({"check": name, "backend": backend, "max_rel_err": worst, "ok": worst < tol,
                     "tensors": len(errs), "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the report
        rows.append({"check": name, "backend": backend, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})


def correctness(device: torch.device, small: bool, rows: list[dict]) -> list[dict]:
    cfg, dtype = (SMALL, torch.float32) if small else (LLAMA, torch.bfloat16)
    tol = FP32_TOL if small else BF16_TOL
    m = 37 if small else 2048
    h, inter = cfg["hidden"], cfg["inter"]
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    for backend in _backends(device):
        for dora in (False, True):
            tag = "dora" if dora else "lora"
            shapes = {"q": (cfg["q"], h), "kv": (cfg["kv"], h), "gate": (inter, h), "down": (h, inter)}
            for name, (o, i) in shapes.items():
                p = _proj(o, i, device=device, dtype=dtype, dora=dora, seed=len(rows))
                x = rnd(m, i).requires_grad_()
                ts = [x, p.lora_A, p.lora_B] + ([p.magnitude] if dora else [])
                _check(f"lora_linear {name} {o}x{i} {tag} M={m}", lambda: lora_projection(x, p, backend=backend),
                       lambda: lora_linear_reference(x, p, dtype=torch.float64), ts, [rnd(m, o)], tol, rows, backend)
            qkv = [_proj(o, h, device=device, dtype=dtype, dora=dora, bias=True, seed=50 + j)
                   for j, o in enumerate((cfg["q"], cfg["kv"], cfg["kv"]))]  # fmt: skip
            x = rnd(m, h).requires_grad_()
            ts = [x] + [t for p in qkv for t in (p.lora_A, p.lora_B, p.bias)]
            _check(f"lora_qkv {tag}+bias M={m}", lambda: lora_qkv(x, q=qkv[0], k=qkv[1], v=qkv[2], backend=backend),
                   lambda: lora_qkv_reference(x, q=qkv[0], k=qkv[1], v=qkv[2], dtype=torch.float64), ts,
                   [rnd(m, p.shape[0]) for p in qkv], tol, rows, backend)  # fmt: skip
            mlp = dict(gate=_proj(inter, h, device=device, dtype=dtype, dora=dora, seed=60),
                       up=_proj(inter, h, device=device, dtype=dtype, dora=dora, seed=61),
                       down=_proj(h, inter, device=device, dtype=dtype, dora=dora, seed=62))  # fmt: skip
            ts = [x] + [t for p in mlp.values() for t in (p.lora_A, p.lora_B)]
            _check(f"lora_mlp {tag} M={m}", lambda: lora_mlp(x, **mlp, backend=backend),
                   lambda: lora_mlp_reference(x, **mlp, dtype=torch.float64), ts, [rnd(m, h)], tol, rows, backend)
    _check_small_ops(cfg, m, device, dtype, tol, rows, rnd)
    _dequant_writers(cfg, device, dtype, rows)
    decoder_layer(device, small, rows)
    return rows


def _dequant_writers(cfg, device, dtype, rows: list[dict]) -> None:
    """The writers of the dequant backend's buffer (bitsandbytes, Triton) vs the exact torch reference: W of the
    gate projection, NF4 + double quant, in the compute dtype (bitwise up to an FMA-rounded absmax)."""
    from slimtune.ops import gemm_dequant

    w = quantize_4bit(torch.randn(cfg["inter"], cfg["hidden"], device=device, dtype=dtype) * 0.02)
    want = w.dequantize(dtype)
    for writer in ("bnb", "triton"):
        if writer == "triton" and not (dispatch.triton_available() and device.type == "cuda"):
            continue
        old = gemm_dequant._writer
        gemm_dequant._writer = lambda base, dt, writer=writer: writer
        try:
            got = gemm_dequant._dequantize_into(w, dtype)
            err = _rel(got, want)
            rows.append({"check": f"nf4 dequant into the buffer {tuple(w.shape)}", "backend": writer,
                         "max_rel_err": err, "ok": err < 1e-3, "tensors": 1})  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            rows.append({"check": "nf4 dequant into the buffer", "backend": writer, "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
        finally:
            gemm_dequant._writer = old


def _check_small_ops(cfg, m, device, dtype, tol, rows, rnd) -> None:
    import torch.nn.functional as F

    from slimtune.ops import linear_cross_entropy, rms_norm, rope

    h, hd = cfg["hidden"], cfg["head_dim"]
    for backend in [b for b in _backends(device) if b != "dequant"]:
        x, w = rnd(m, h).requires_grad_(), (1 + 0.1 * rnd(h)).requires_grad_()

        def norm_ref(x=x, w=w):
            x64 = x.double()
            return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

        _check(f"rms_norm {h} M={m}", lambda: rms_norm(x, w, eps=1e-5, backend=backend), norm_ref, [x, w],
               [rnd(m, h)], tol, rows, backend)
        q = rnd(1, m, cfg["heads"], hd).requires_grad_()
        k = rnd(1, m, cfg["kv_heads"], hd).requires_grad_()
        ang = torch.arange(m, device=device)[:, None] * (1e4 ** (-torch.arange(0, hd, 2, device=device) / hd))
        ang = torch.cat((ang, ang), -1)[None]  # (1, T, D)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

        def rope_ref64(q=q, k=k):
            c, s = cos.double()[:, :, None], sin.double()[:, :, None]
            rot = lambda t: torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1)  # noqa: E731
            return q.double() * c + rot(q.double()) * s, k.double() * c + rot(k.double()) * s

        _check(f"rope {cfg['heads']}/{cfg['kv_heads']}x{hd} M={m}", lambda: rope(q, k, cos=cos, sin=sin,
               backend=backend), rope_ref64, [q, k], [rnd(*q.shape), rnd(*k.shape)], tol, rows, backend)  # fmt: skip
        vocab = cfg["vocab"] if m * cfg["vocab"] < 2**31 else 32768
        head = (rnd(vocab, h) * h**-0.5).requires_grad_()
        tgt = torch.randint(0, vocab, (m,), generator=torch.Generator().manual_seed(3)).to(device)
        _check(f"linear_ce V={vocab} M={m}", lambda: linear_cross_entropy(x, head, tgt, backend=backend),
               lambda: F.cross_entropy(x.double() @ head.double().T, tgt), [x, head],
               [torch.ones((), device=device)], tol, rows, backend)  # fmt: skip


def decoder_layer(device: torch.device, small: bool, rows: list[dict]) -> None:
    """The fused 1-layer Llama-3.1-8B (NF4 + LoRA r16, every fused op on `auto`) vs the same model in float64 on the
    torch backend: loss and every adapter gradient."""
    from slimtune.adapters.base import get_adapter_class
    from slimtune.adapters.inject import inject
    from slimtune.bench.bench_config import resolve_bench_config
    from slimtune.bench.random_model import random_base
    from slimtune.models.fused import fuse_model

    name = "SmolLM2-135M" if small else "Llama-3.1-8B"
    dtype, tol, seq = (torch.float32, FP32_TOL, 29) if small else (torch.bfloat16, 5e-2, 2048)
    model = random_base(resolve_bench_config(name, layers=1), device=device, dtype=dtype)
    inject(model, get_adapter_class("lora").Config(rank=16, alpha=32.0))
    g = torch.Generator().manual_seed(5)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    report = fuse_model(model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
    ref = copy.deepcopy(model).double()
    with dispatch.use_backend("torch"):
        loss64 = ref(input_ids=ids, labels=ids).loss
        loss64.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for mode in ["auto"] + _backends(device):
        model.zero_grad(set_to_none=True)
        try:
            with dispatch.use_backend(mode):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            errs = {n: _rel(p.grad, want[n]) for n, p in model.named_parameters() if p.requires_grad}
            worst = max(errs.values())
            rows.append({"check": f"decoder layer {name} x1 seq={seq} loss+{len(errs)} grads ({len(report.fused)} "
                         "fused)", "backend": mode, "max_rel_err": max(worst, _rel(loss, loss64)),
                         "ok": max(worst, _rel(loss, loss64)) < tol, "tensors": len(errs) + 1})  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            rows.append({"check": f"decoder layer {name}", "backend": mode, "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip


def _time_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def microbench(device: torch.device, small: bool, rows: list[dict]) -> list[dict]:
    """Forward + backward of one adapted projection per backend at Llama-3.1-8B shapes, M = 1k / 4k / 16k; the
    dense bf16 cuBLAS GEMMs of the same shape (3 per step: y, dX, no dW) as the floor."""
    cfg, dtype = (SMALL, torch.float32) if small else (LLAMA, torch.bfloat16)
    h, inter = cfg["hidden"], cfg["inter"]
    shapes = {"q/o": (cfg["q"], h), "k/v": (cfg["kv"], h), "gate/up": (inter, h), "down": (h, inter)}
    for m in ((16, 64) if small else (1024, 4096, 16384)):
        for name, (o, i) in shapes.items():
            proj = _proj(o, i, device=device, dtype=dtype)
            x = torch.randn(m, i, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(m, o, device=device, dtype=dtype)
            w = torch.randn(o, i, device=device, dtype=dtype)
            row = {"M": m, "proj": name, "shape": f"{o}x{i}",
                   "dense_floor_ms": _time_ms(lambda: (x.detach() @ w.T, dy @ w), device)}  # fmt: skip
            for backend in _backends(device):
                def step(backend=backend):
                    y = lora_projection(x, proj, backend=backend)
                    torch.autograd.grad(y, (x, proj.lora_A, proj.lora_B), dy)

                try:
                    row[f"{backend}_ms"] = _time_ms(step, device)
                except Exception as exc:  # noqa: BLE001
                    row[f"{backend}_ms"] = None
                    row[f"{backend}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
    return rows


def _write_verdicts(out: Path) -> list[str]:
    lines = dispatch.dispatch_report()
    (out / "dispatch.txt").write_text("\n".join(lines) + "\n")
    return lines


def dispatch_verdicts(device: torch.device, small: bool, out: Path) -> list[str]:
    """What `auto` measures for each projection shape and op at M = 4096 (cache written under the results; the
    verdicts so far rewritten to dispatch.txt after each op)."""
    os.environ[autotune.CACHE_ENV] = str(out / "dispatch.json")
    autotune.clear()
    if device.type != "cuda":
        dispatch.set_measure_on_cpu(True)
    cfg, dtype = (SMALL, torch.float32) if small else (LLAMA, torch.bfloat16)
    m, h, inter = (32 if small else 4096), cfg["hidden"], cfg["inter"]
    for o, i in ((cfg["q"], h), (cfg["kv"], h), (inter, h), (h, inter)):
        for dora in (False, True):
            proj = _proj(o, i, device=device, dtype=dtype, dora=dora)
            lora_projection(torch.randn(m, i, device=device, dtype=dtype, requires_grad=True), proj)
            _write_verdicts(out)
    x = torch.randn(m, h, device=device, dtype=dtype, requires_grad=True)
    mlp = {k: _proj(o, i, device=device, dtype=dtype, seed=j) for j, (k, (o, i))
           in enumerate({"gate": (inter, h), "up": (inter, h), "down": (h, inter)}.items())}  # fmt: skip
    lora_mlp(x, **mlp)
    _write_verdicts(out)
    qkv = [_proj(o, h, device=device, dtype=dtype, seed=9 + j) for j, o in enumerate((cfg["q"], cfg["kv"], cfg["kv"]))]
    lora_qkv(x, q=qkv[0], k=qkv[1], v=qkv[2])
    _write_verdicts(out)
    from slimtune.ops import rms_norm, rope

    rms_norm(x, torch.ones(h, device=device, dtype=dtype, requires_grad=True))
    _write_verdicts(out)
    q = torch.randn(1, m, cfg["heads"], cfg["head_dim"], device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, m, cfg["kv_heads"], cfg["head_dim"], device=device, dtype=dtype, requires_grad=True)
    ang = torch.randn(1, m, cfg["head_dim"], device=device)
    rope(q, k, cos=ang.cos().to(dtype), sin=ang.sin().to(dtype))
    return _write_verdicts(out)


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("correctness", "microbench", "dispatch", "all"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="tiny shapes, fp32, on CPU unless CUDA is there")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.small:
        print("no CUDA device: run with --small for the CPU version", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if a.what == "all":  # one process for the three (the dry run)
        return max(main([w, "--out", str(a.out)] + (["--small"] if a.small else []))
                   for w in ("correctness", "microbench", "dispatch"))  # fmt: skip
    if a.what == "dispatch":
        lines = dispatch_verdicts(device, a.small, a.out)
        print("\n".join(lines))
        return 0
    rows = Rows(a.out / f"{a.what}.jsonl")
    (correctness if a.what == "correctness" else microbench)(device, a.small, rows)
    (a.out / f"{a.what}.json").write_text(json.dumps(rows, indent=1))
    (a.out / f"{a.what}.md").write_text(_table(rows) + "\n")
    print(_table(rows))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
