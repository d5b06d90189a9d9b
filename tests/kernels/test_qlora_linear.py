"""QLoRA linear (ops/lora_linear.py's Function on the torch, dequant and triton primitives): each backend's
primitives vs the torch ones, the Function vs float64 autograd of the naive formula (every gradient), frozen
factors, the per-step DoRA norm cache, and what the Function saves for backward."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from slimtune.errors import ModelError
from slimtune.ops.generation import weights_changed
from slimtune.ops.lora_linear import LoRAProjection, lora_linear, lora_linear_reference, lora_projection
from slimtune.ops.nf4 import quantize_4bit

from kernel_helpers import DEVICE, INTERPRET, TOL, R, rel

ql = importlib.import_module("slimtune.kernels.qlora_linear")
ref = importlib.import_module("slimtune.ops.lora_linear")  # the module (slimtune.ops re-exports the function)
dq = importlib.import_module("slimtune.ops.gemm_dequant")
BACKENDS = ["torch", "dequant", "triton"]

T, IN, OUT = 37, 200, 136


def make_base(kind: str, seed: int, out_f: int = OUT, in_f: int = IN):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(DEVICE)
    if kind == "dense":
        return w
    if kind == "dense_t":  # a non-contiguous (transposed) dense base
        return w.T.contiguous().T
    return quantize_4bit(w, double_quant=(kind == "nf4dq"))


def make_proj(base, *, seed, rank=R, M=False, dora=False, bias=False, frozen=(), dtype=torch.float32, scale=1.7):
    """Random, nonzero factors (B included) in `dtype`; `frozen` names factors without requires_grad."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = base.shape

    def p(*shape, std=0.1, shift=0.0, name=""):
        t = (torch.randn(*shape, generator=g) * std + shift).to(DEVICE, dtype)
        if name == "magnitude":
            t = t.abs()
        return t.requires_grad_(name not in frozen)

    return LoRAProjection(
        base=base,
        bias=p(out_f, name="bias") if bias else None,
        lora_A=p(rank, in_f, name="lora_A"),
        lora_B=p(out_f, rank, name="lora_B"),
        scale=scale,
        lora_M=p(rank, rank, std=0.3, shift=0.5, name="lora_M") if M else None,
        magnitude=p(out_f, std=0.2, shift=1.0, name="magnitude") if dora else None,
    )


def run(fn, x, proj, dy):
    """(y, {name: grad}) for x and every factor that requires grad."""
    names = ["x"] + [n for n in ("lora_A", "lora_B", "lora_M", "magnitude", "bias") if _needs(proj, n)]
    tensors = [x] + [getattr(proj, n) for n in names[1:]]
    y = fn(x, proj)
    grads = torch.autograd.grad(y, tensors, dy.to(y.dtype))
    return y, dict(zip(names, grads, strict=True))


def _needs(proj, name):
    t = getattr(proj, name)
    return t is not None and t.requires_grad


def check_against_float64(proj, dtype, backend, *, tol=None, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(T, IN, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(T, OUT, generator=g).to(DEVICE)
    y, grads = run(lambda x, p: lora_projection(x, p, backend=backend), x, proj, dy)
    y64, grads64 = run(lambda x, p: lora_linear_reference(x, p, dtype=torch.float64), x, proj, dy)
    assert y.dtype == dtype and y.shape == (T, OUT)
    tol = tol or TOL[dtype]
    errs = {"y": rel(y, y64)} | {k: rel(grads[k], grads64[k]) for k in grads64}
    assert all(e < tol for e in errs.values()), errs
    for k, t in grads.items():
        assert t.dtype == (x.dtype if k == "x" else getattr(proj, k).dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    """Several row/column tiles and a partial K tile on the odd shapes (the interpreter is slow, so only here)."""
    monkeypatch.setattr(ql, "DEFAULT_BLOCKS", ql.GemmBlocks(block_m=16, block_n=32, block_k=32, group_m=2))


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind,variant",
    [
        ("nf4dq", "lora"),
        ("nf4dq", "lora_M_bias"),
        ("nf4dq", "dora_M"),
        ("nf4", "dora"),
        ("dense", "lora_M"),
        ("dense_t", "dora_bias"),
    ],
)
def test_matches_float64_autograd_fp32(kind, variant, backend):
    base = make_base(kind, seed=1)
    proj = make_proj(base, seed=2, M="_M" in variant, dora="dora" in variant, bias="bias" in variant)
    check_against_float64(proj, torch.float32, backend)


def test_small_tiles_nf4_dora_M(small_blocks):
    proj = make_proj(make_base("nf4dq", seed=3), seed=4, M=True, dora=True, bias=True)
    check_against_float64(proj, torch.float32, "triton", seed=5)


@pytest.mark.parametrize("kind,variant", [("nf4dq", "dora_M"), ("dense", "lora")])
def test_matches_float64_autograd_fp16(kind, variant):
    # fp16 activations and base, fp32 trainable factors (the usual mixed setting)
    base = make_base(kind, seed=6)
    if kind == "dense":
        base = base.half()
    proj = make_proj(base, seed=7, M="_M" in variant, dora="dora" in variant)
    check_against_float64(proj, torch.float16, "triton", seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "dequant"])
@pytest.mark.parametrize("kind", ["nf4dq", "dense"])
def test_matches_float64_autograd_bf16_gpu(kind, backend):
    base = make_base(kind, seed=9)
    if kind == "dense":
        base = base.bfloat16()
    proj = make_proj(base, seed=10, M=True, dora=True, dtype=torch.bfloat16)
    check_against_float64(proj, torch.bfloat16, backend, seed=11)


# ------------------------------------------------------------------------------------------------------------------


def _poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", ["triton", "dequant"])
@pytest.mark.parametrize("kind", ["nf4dq", "dense_t"])
def test_primitives_match_torch_pieces(kind, backend, small_blocks):
    ql = ref.backend_ops(backend)
    base = make_base(kind, seed=12)
    g = torch.Generator().manual_seed(13)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x, dy, left, right, left_t, right_t = rnd(T, IN), rnd(T, OUT), rnd(T, R), rnd(R, OUT), rnd(T, R), rnd(R, IN)
    colscale, bias = rnd(OUT).abs() + 0.5, rnd(OUT)

    want = ref.base_matmul(x, base, lora_left=left, lora_right=right, lora_scale=0.7, out_scale=colscale, bias=bias)
    out = _poisoned(T, OUT)
    got = ql.base_matmul(
        x, base, lora_left=left, lora_right=right, lora_scale=0.7, out_scale=colscale, bias=bias, out=out
    )
    assert got is out and rel(got, want) < TOL[torch.float32]

    want = ref.base_matmul_t(dy, base, out_scale=colscale, lora_left=left_t, lora_right=right_t)
    out = _poisoned(T, IN)
    got = ql.base_matmul_t(dy, base, out_scale=colscale, lora_left=left_t, lora_right=right_t, out=out)
    assert got is out and rel(got, want) < TOL[torch.float32]
    acc = rnd(T, IN)
    want_acc = acc + ref.base_matmul_t(dy, base)
    assert rel(ql.base_matmul_t(dy, base, out=acc, accumulate=True), want_acc) < TOL[torch.float32]

    want = ref.base_dmag(x, dy, base, lora_left=left, lora_right=right, lora_scale=0.7)
    assert rel(ql.base_dmag(x, dy, base, lora_left=left, lora_right=right, lora_scale=0.7), want) < TOL[torch.float32]
    assert rel(ql.base_row_norm_sq(base), ref.base_row_norm_sq(base)) < 1e-5


def test_dora_norm_without_materialising_w():
    base = make_base("nf4dq", seed=14)
    proj = make_proj(base, seed=15, M=True, dora=True)
    want = ref.dora_weight_norm(base.dequantize(torch.float64), proj.lora_A.double(), proj.lora_B.double(),
                                proj.scale, proj.lora_M.double())  # fmt: skip
    for backend in BACKENDS:
        got = ref.dora_norm(ref.backend_ops(backend), proj, proj.lora_A, proj.lora_B, proj.lora_M)
        assert rel(got, want) < 1e-5


def test_dora_norm_is_cached_until_an_optimizer_step(monkeypatch):
    proj = make_proj(make_base("nf4dq", seed=40), seed=41, M=True, dora=True)
    ops = ref.backend_ops("dequant")
    calls = []
    counting = type(ops)(**vars(ops))
    counting.base_matmul = lambda *a, **k: calls.append(1) or ops.base_matmul(*a, **k)
    norm = lambda: ref.dora_norm(counting, proj, proj.lora_A, proj.lora_B, proj.lora_M)  # noqa: E731
    want = lambda: ref.dora_weight_norm(  # noqa: E731
        make_base("nf4dq", seed=40).dequantize(torch.float64), proj.lora_A.double(), proj.lora_B.double(),
        proj.scale, proj.lora_M.double())
    n1 = norm()
    n2 = norm()  # same step (e.g. a recompute)
    assert len(calls) == 1 and n2 is n1
    with torch.no_grad():
        proj.lora_B.add_(0.05)  # an in-place edit: bumps the version counter
    n3 = norm()
    assert len(calls) == 2 and rel(n3, want()) < 1e-5 and rel(n1, want()) > 1e-3
    # bitsandbytes' 8-bit AdamW writes through p.data (CPU) / raw pointers (CUDA), FSDP2 gathers under a preserved
    # version counter: no version bump. The Trainer's weights_changed() after the step is what the cache sees.
    proj.lora_A.data.add_(0.05)
    assert proj.lora_A._version == 0 and norm() is n3  # nothing says the weights changed
    weights_changed()
    n4 = norm()
    assert len(calls) == 3 and rel(n4, want()) < 1e-5 and rel(n3, want()) > 1e-3
    # FSDP2 copies the all-gathered (updated) shards into the same unsharded tensor, version kept (its
    # _fsdp_collectives.py): same object, same storage, same version. The step's weights_changed() is what counts.
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(proj.lora_B):
        proj.lora_B.copy_(proj.lora_B * 1.5)
    assert norm() is n4 and rel(n4, want()) > 1e-3
    weights_changed()
    n5 = norm()
    assert len(calls) == 4 and rel(n5, want()) < 1e-5


@pytest.mark.parametrize("backend", ["dequant", "torch"])
def test_aligned_rows_bitsandbytes_dequant_and_buffer_reuse(backend):
    # in_features % 64 == 0: the dequant backend writes bitsandbytes' dequantization into its reused buffer
    dq.release_buffers()
    projs = [make_proj(make_base("nf4dq", seed=50 + i, out_f=OUT, in_f=192), seed=60 + i, dora=i == 1, bias=True)
             for i in range(2)]  # fmt: skip
    g = torch.Generator().manual_seed(70)
    for proj in projs:
        x = torch.randn(T, 192, generator=g).to(DEVICE).requires_grad_()
        dy = torch.randn(T, OUT, generator=g).to(DEVICE)
        y, grads = run(lambda x, p: lora_projection(x, p, backend=backend), x, proj, dy)
        y64, grads64 = run(lambda x, p: lora_linear_reference(x, p, dtype=torch.float64), x, proj, dy)
        errs = {"y": rel(y, y64)} | {k: rel(grads[k], grads64[k]) for k in grads64}
        assert all(e < TOL[torch.float32] for e in errs.values()), errs
    if backend == "dequant":
        assert dq.buffer_bytes() == OUT * 192 * 4  # one buffer, shared by both layers


# ------------------------------------------------------------------------------------------------------------------


def _saved_bytes(fn):
    """Run fn() under saved_tensors_hooks; return (output, [saved tensors])."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _activation_bytes(saved, params):
    ptrs = {p.data_ptr() for p in params if p is not None}
    return sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in ptrs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_x_and_xa(backend):
    base = make_base("nf4dq", seed=16)
    proj = make_proj(base, seed=17, dora=True)
    x = torch.randn(T, IN, device=DEVICE, requires_grad=True)
    y, saved = _saved_bytes(lambda: lora_projection(x, proj, backend=backend))
    expected = x.nbytes + T * R * 4 + OUT * 4  # X, X Aᵀ (T, r), DoRA norm (out,)
    assert _activation_bytes(saved, proj.factors()) == expected
    y.sum().backward()
    assert proj.lora_A.grad is not None and proj.magnitude.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_factors_get_no_grad_and_x_is_not_saved(backend):
    # LaMDA after B is frozen / IntTune: only the r×r middle matrix trains -> X is not needed for backward.
    base = make_base("nf4", seed=18)
    proj = make_proj(base, seed=19, M=True, frozen=("lora_A", "lora_B"))
    x = torch.randn(T, IN, device=DEVICE, requires_grad=True)
    y, saved = _saved_bytes(lambda: lora_projection(x, proj, backend=backend))
    assert _activation_bytes(saved, proj.factors()) == T * R * 4  # X Aᵀ only
    check_against_float64(proj, torch.float32, backend, seed=20)
    y.sum().backward()
    assert proj.lora_A.grad is None and proj.lora_B.grad is None and proj.lora_M.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_dropout_mask_is_regenerated_in_backward(backend):
    p_drop = 0.3
    proj = dataclasses.replace(make_proj(make_base("nf4dq", seed=30), seed=31, M=True, dora=True), dropout=p_drop)
    g = torch.Generator().manual_seed(32)
    x = torch.randn(T, IN, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(T, OUT, generator=g).to(DEVICE)
    torch.manual_seed(33)
    y, grads = run(lambda x, p: lora_projection(x, p, backend=backend), x, proj, dy)
    torch.manual_seed(33)  # the op draws its mask seed from torch's default generator
    mask = ref.dropout_mask((T, IN), p_drop, ref.dropout_seed(proj), device=x.device, dtype=x.dtype)
    assert 0.2 < (mask == 0).float().mean() < 0.4
    y64, grads64 = run(
        lambda x, p: lora_linear_reference(x, p, dtype=torch.float64, lora_input=x * mask), x, proj, dy
    )
    errs = {"y": rel(y, y64)} | {k: rel(grads[k], grads64[k]) for k in grads64}
    assert all(e < TOL[torch.float32] for e in errs.values()), errs
    _, saved = _saved_bytes(lambda: lora_projection(x, proj, backend=backend))
    assert _activation_bytes(saved, proj.factors()) == x.nbytes + T * R * 4 + OUT * 4  # no mask saved


def test_public_op_3d_input_and_base_only():
    base = make_base("nf4", seed=21)
    proj = make_proj(base, seed=22)
    x = torch.randn(2, 5, IN, device=DEVICE)
    y = lora_linear(x, base=base, lora_A=proj.lora_A, lora_B=proj.lora_B, scale=proj.scale, backend="triton")
    assert y.shape == (2, 5, OUT)
    assert rel(y, lora_linear_reference(x.reshape(-1, IN), proj, dtype=torch.float64).reshape(2, 5, OUT)) < 1e-5
    y0 = lora_linear(x, base=base, backend="torch")  # no adapter: the base alone
    assert rel(y0, x @ base.dequantize(torch.float32).T) < 1e-5


def test_shape_errors_are_one_line():
    base = make_base("dense", seed=23)
    with pytest.raises(ModelError, match="lora_A"):
        LoRAProjection(base=base, lora_A=torch.zeros(R, IN + 1), lora_B=torch.zeros(OUT, R))
    with pytest.raises(ModelError):
        LoRAProjection(base=base, lora_A=torch.zeros(R, IN))


@pytest.mark.skipif(not INTERPRET, reason="the Triton writer runs under TRITON_INTERPRET=1 on CPU")
def test_dequant_backend_triton_writer_without_bitsandbytes(monkeypatch):
    # a GPU without bitsandbytes: the buffer is written by the Triton dequant kernel (forced here on CPU)
    monkeypatch.setattr(dq, "_writer", lambda base, dtype: "triton")
    proj = make_proj(make_base("nf4dq", seed=80), seed=81, dora=True, bias=True)
    check_against_float64(proj, torch.float32, "dequant", seed=82)


def test_dequant_writer_is_not_triton_below_sm80(monkeypatch):
    """Issue 23: the dequant backend's buffer writer chose the Triton kernel on any CUDA device, also below sm_80
    where the fused kernels are gated off (dispatch.triton_allowed); now it falls back to the torch writer."""
    from types import SimpleNamespace

    from slimtune.ops import dispatch

    monkeypatch.setattr(dispatch, "_triton_ok", True)
    monkeypatch.setattr(dq, "triton_module", lambda name: SimpleNamespace())  # "installed"
    gpu = torch.device("cuda", 0)
    base = SimpleNamespace(in_features=IN, blocksize=64, quant_state=None, device=gpu,
                           packed=SimpleNamespace(is_cuda=True, device=gpu))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert dq._writer(base, torch.float16) == "torch"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert dq._writer(base, torch.float16) == "triton"


PRECISION = """
import torch
from slimtune.kernels.qlora_linear import _dot_precision
seen = [_dot_precision()]
torch.backends.cuda.matmul.allow_tf32 = True  # the legacy API
seen.append(_dot_precision())
torch.set_float32_matmul_precision("highest")
seen.append(_dot_precision())
torch.set_float32_matmul_precision("high")
seen.append(_dot_precision())
torch.backends.cuda.matmul.fp32_precision = "ieee"  # the new one: the legacy reads raise from here on
seen.append(_dot_precision())
torch.backends.cuda.matmul.fp32_precision = "tf32"
seen.append(_dot_precision())
print(",".join(seen))
"""


def test_dot_precision_reads_either_api():
    import subprocess
    import sys

    # a subprocess: once the new API is used, torch.get_float32_matmul_precision() raises for the whole process
    r = subprocess.run([sys.executable, "-c", PRECISION], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[-1] == "ieee,tf32,ieee,tf32,ieee,tf32", r.stderr[-1500:]
