"""Fused q/k/v projections (ops/lora_qkv.py on each backend's primitives): the Function vs float64 autograd of the formula (every gradient)
and X saved once."""

from __future__ import annotations


import pytest
import torch

from slimtune.ops.lora_qkv import lora_qkv, lora_qkv_reference
from kernel_helpers import DEVICE, TOL, R, random_projection, rel

T, HID = 37, 200
Q_OUT, KV_OUT = 136, 72  # 136*200 and 72*200 are multiples of 64 (NF4 blocks)
NAMES = ("lora_A", "lora_B", "lora_M", "magnitude", "bias")


def proj(kind, out_f, seed, **kw):
    return random_projection(kind, out_f, HID, seed, scale=2.0, **kw)


def check(q, k, v, dtype, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HID, generator=g).to(DEVICE, dtype).requires_grad_()
    dys = [torch.randn(T, p.shape[0], generator=g).to(DEVICE) for p in (q, k, v)]
    named = [("x", x)] + [
        (f"{i}.{n}", getattr(p, n)) for i, p in enumerate((q, k, v)) for n in NAMES
        if getattr(p, n) is not None and getattr(p, n).requires_grad
    ]  # fmt: skip
    tensors = [t for _, t in named]

    def grads(outs):
        return torch.autograd.grad(outs, tensors, [d.to(outs[0].dtype) for d in dys])

    outs = lora_qkv(x, q=q, k=k, v=v, backend=backend)
    outs64 = lora_qkv_reference(x, q=q, k=k, v=v, dtype=torch.float64)
    errs = {f"out{i}": rel(a, b) for i, (a, b) in enumerate(zip(outs, outs64, strict=True))}
    errs |= {n: rel(a, b) for (n, _), a, b in zip(named, grads(outs), grads(outs64), strict=True)}
    assert all(o.dtype == dtype for o in outs)
    assert all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["torch", "dequant", "triton"])
def test_mixed_projections_fp32(backend):
    q = proj("nf4dq", Q_OUT, 1, M=True, bias=True)
    k = proj("dense", KV_OUT, 2, lora=False, bias=True)  # no adapter on k (PEFT's default q,v targets)
    v = proj("nf4", KV_OUT, 3, dora=True)
    check(q, k, v, torch.float32, backend, seed=4)


def test_nf4_fp16():
    q, k, v = proj("nf4dq", Q_OUT, 5, dora=True), proj("nf4dq", KV_OUT, 6), proj("nf4dq", KV_OUT, 7, M=True)
    check(q, k, v, torch.float16, "triton", seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "dequant"])
def test_nf4_bf16_gpu(backend):
    q, k, v = proj("nf4dq", Q_OUT, 9, dora=True), proj("nf4dq", KV_OUT, 10), proj("nf4dq", KV_OUT, 11, M=True)
    check(q, k, v, torch.bfloat16, backend, seed=12)


@pytest.mark.parametrize("backend", ["torch", "dequant", "triton"])
def test_saves_x_once(backend):
    q, k, v = proj("nf4dq", Q_OUT, 13), proj("nf4dq", KV_OUT, 14, lora=False), proj("nf4dq", KV_OUT, 15)
    x = torch.randn(2, 19, HID, device=DEVICE, requires_grad=True)  # (batch, seq, hidden): 38 tokens
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = lora_qkv(x, q=q, k=k, v=v, backend=backend)
    assert [tuple(o.shape) for o in outs] == [(2, 19, Q_OUT), (2, 19, KV_OUT), (2, 19, KV_OUT)]
    params = {t.data_ptr() for p in (q, k, v) for t in p.factors() if t is not None}
    activ = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.nbytes for t in activ) == (38 * HID + 2 * 38 * R) * 4  # X once + X Aᵀ of q and v
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and q.lora_A.grad is not None and v.lora_B.grad is not None
