"""LoRA gated MLP (ops/lora_mlp.py, kernels/lora_mlp.py): the Function vs float64 autograd of the formula (every
gradient) for SwiGLU, GeGLU (gelu_tanh) and Phi-3's packed gate_up, the activation kernels vs torch, what is saved
for backward, and the reuse of dead buffers for gradients."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from slimtune.ops.lora_linear import LoRAProjection
from slimtune.ops.lora_mlp import lora_mlp, lora_mlp_reference
from kernel_helpers import DEVICE, TOL, R, random_projection, rel

kmlp = importlib.import_module("slimtune.kernels.lora_mlp")
ref = importlib.import_module("slimtune.ops.lora_mlp")  # the module (slimtune.ops re-exports the function lora_mlp)
rl = importlib.import_module("slimtune.ops.lora_linear")

T, HID, INTER = 37, 200, 136  # gate/up (136, 200), down (200, 136): 27200 values = 425 NF4 blocks
NAMES = ("lora_A", "lora_B", "lora_M", "magnitude", "bias")


def proj(kind, out_f, in_f, seed, **kw):
    return random_projection(kind, out_f, in_f, seed, scale=1.3, **kw)


def grads_of(y, x, projs, dy):
    named = [("x", x)] + [
        (f"{i}.{n}", getattr(p, n)) for i, p in enumerate(projs) for n in NAMES
        if getattr(p, n) is not None and getattr(p, n).requires_grad
    ]  # fmt: skip
    gs = torch.autograd.grad(y, [t for _, t in named], dy.to(y.dtype))
    return {k: g for (k, _), g in zip(named, gs, strict=True)}


def _kw(projs):
    return dict(gate_up=projs[0], down=projs[1]) if len(projs) == 2 else dict(gate=projs[0], up=projs[1], down=projs[2])


def check(projs, dtype, backend, seed=0, activation="silu"):
    """projs: (gate, up, down) or (gate_up, down)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HID, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(T, HID, generator=g).to(DEVICE)
    y = lora_mlp(x, backend=backend, activation=activation, **_kw(projs))
    y64 = lora_mlp_reference(x, dtype=torch.float64, activation=activation, **_kw(projs))
    got, want = grads_of(y, x, projs, dy), grads_of(y64, x, projs, dy)
    errs = {"y": rel(y, y64)} | {k: rel(got[k], want[k]) for k in want}
    assert y.dtype == dtype and all(e < TOL[dtype] for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nf4_lora_variants_fp32(backend):
    projs = (
        proj("nf4dq", INTER, HID, 1),  # gate: plain LoRA
        proj("nf4dq", INTER, HID, 2, dora=True, M=True),  # up: DoRA + middle matrix
        proj("nf4", HID, INTER, 3, M=True, bias=True),  # down: B M A, bias
    )
    check(projs, torch.float32, backend, seed=4)


def test_dense_bases_partly_adapted_fp32():
    projs = (
        proj("dense", INTER, HID, 5, dora=True),
        proj("dense", INTER, HID, 6, lora=False),  # up without adapter
        proj("dense", HID, INTER, 7, frozen=("lora_A",)),  # down with frozen A (LaMDA)
    )
    check(projs, torch.float32, "triton", seed=8)


def test_nf4_fp16():
    projs = (
        proj("nf4dq", INTER, HID, 9),
        proj("nf4dq", INTER, HID, 10, M=True),
        proj("nf4dq", HID, INTER, 11, dora=True),
    )
    check(projs, torch.float16, "triton", seed=12)


@pytest.mark.gpu
def test_nf4_bf16_gpu():
    projs = (proj("nf4dq", INTER, HID, 13), proj("nf4dq", INTER, HID, 14, dora=True), proj("nf4dq", HID, INTER, 15))
    check(projs, torch.bfloat16, "triton", seed=16)


@pytest.mark.gpu
def test_packed_gelu_bf16_gpu():
    projs = (proj("nf4dq", 2 * INTER, HID, 60, dora=True), proj("nf4dq", HID, INTER, 61))
    check(projs, torch.bfloat16, "triton", seed=62, activation="gelu_tanh")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_glu_kernels_match_torch(activation, dtype, packed):
    """Triton vs torch activation pieces, on contiguous (T, I) tensors or the two halves of a (T, 2I) buffer."""
    g = torch.Generator().manual_seed(17)
    dh = torch.randn(T, INTER, generator=g).mul(3).to(DEVICE, dtype)
    if packed:
        eg = torch.randn(T, 2 * INTER, generator=g).mul(3).to(DEVICE, dtype)
        e, gg = eg[:, :INTER], eg[:, INTER:]
    else:
        e, gg = (torch.randn(T, INTER, generator=g).mul(3).to(DEVICE, dtype) for _ in range(2))
    out = torch.full_like(dh, float("nan"))
    h = kmlp.glu(e, gg, activation=activation, out=out)
    assert rel(h, ref.glu(e, gg, activation=activation)) < 1e-3 and torch.isfinite(out).all()
    if packed:
        eg1, eg2 = eg.clone(), eg.clone()
        e1, g1, e2, g2 = eg1[:, :INTER], eg1[:, INTER:], eg2[:, :INTER], eg2[:, INTER:]
    else:
        e1, g1, e2, g2 = e.clone(), gg.clone(), e.clone(), gg.clone()
    kmlp.glu_backward_(dh, e1, g1, activation=activation)
    ref.glu_backward_(dh, e2, g2, activation=activation)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel(e1, e2) < tol and rel(g1, g2) < tol
    # against autograd of act(e) * g in float64 (HF's activation functions)
    F = torch.nn.functional
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    e64, g64 = e.double().requires_grad_(), gg.double().requires_grad_()
    de, dg = torch.autograd.grad(act(e64) * g64, (e64, g64), dh.double())
    assert rel(e1, de) < tol * 10 and rel(g1, dg) < tol * 10


# ------------------------------------------------------------------------------------------------------------------


def _record_saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saves_x_e_g_and_reuses_them_for_gradients(backend):
    projs = (proj("nf4dq", INTER, HID, 18), proj("nf4dq", INTER, HID, 19), proj("nf4dq", HID, INTER, 20))
    x0 = torch.randn(T, HID, device=DEVICE, requires_grad=True)
    x = x0 * 1.0  # a non-leaf activation, like an RMSNorm output
    y, saved = _record_saved(
        lambda: lora_mlp(x, gate=projs[0], up=projs[1], down=projs[2], backend=backend, inplace_input_grad=True)
    )
    params = {t.data_ptr() for p in projs for t in p.factors() if t is not None}
    activ = [t for t in saved if t.data_ptr() not in params]
    elt = x.element_size()
    # X + e + g (T, I each) + three (T, r) X Aᵀ: nothing else
    assert sum(t.nbytes for t in activ) == (T * HID + 2 * T * INTER + 3 * T * R) * elt
    e, g = (t for t in activ if t.shape == (T, INTER))
    e_val, g_val = e.clone(), g.clone()

    dy = torch.randn(T, HID, device=DEVICE)
    y.backward(dy)
    # e and g now hold de and dg (their buffers were reused), and X holds dX
    e64, g64 = e_val.double().requires_grad_(), g_val.double().requires_grad_()
    h64 = torch.nn.functional.silu(e64) * g64
    down = projs[2]
    dh = (dy.double() @ down.base.dequantize(torch.float64)) + down.scale * (
        (dy.double() @ down.lora_B.double()) @ down.lora_A.double()
    )
    de, dg = torch.autograd.grad(h64, (e64, g64), dh)
    assert rel(e, de) < 1e-5 and rel(g, dg) < 1e-5
    assert rel(x, x0.grad) == 0.0  # dX was written into X's storage
    x64 = x0.detach().double().requires_grad_()
    want = torch.autograd.grad(lora_mlp_reference(x64, gate=projs[0], up=projs[1], down=projs[2]), x64, dy.double())[0]
    assert rel(x0.grad, want) < 1e-5


def test_inplace_input_grad_never_touches_a_leaf():
    projs = (proj("dense", INTER, HID, 25), proj("dense", INTER, HID, 26), proj("dense", HID, INTER, 27))
    x = torch.randn(3, 13, HID, device=DEVICE, requires_grad=True)  # a leaf; lora_mlp reshapes it to a view
    x_val = x.detach().clone()
    y = lora_mlp(x, gate=projs[0], up=projs[1], down=projs[2], backend="torch", inplace_input_grad=True)
    y.sum().backward()
    assert torch.equal(x.detach(), x_val) and x.grad.data_ptr() != x.data_ptr()


def test_lora_dropout_independent_masks():
    pd = 0.25
    projs = tuple(
        dataclasses.replace(p, dropout=pd)
        for p in (proj("nf4dq", INTER, HID, 28), proj("dense", INTER, HID, 29, dora=True), proj("nf4", HID, INTER, 30))
    )
    g = torch.Generator().manual_seed(31)
    x = torch.randn(T, HID, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(T, HID, generator=g).to(DEVICE)
    torch.manual_seed(32)
    y = lora_mlp(x, gate=projs[0], up=projs[1], down=projs[2], backend="triton")
    got = grads_of(y, x, projs, dy)
    torch.manual_seed(32)  # seeds are drawn in the order gate, up, down
    seeds = [rl.dropout_seed(p) for p in projs]
    m_g, m_u = (rl.dropout_mask((T, HID), pd, s, device=x.device, dtype=x.dtype) for s in seeds[:2])
    m_d = rl.dropout_mask((T, INTER), pd, seeds[2], device=x.device, dtype=x.dtype)
    assert not torch.equal(m_g, m_u)
    f64 = torch.float64
    e = rl.lora_linear_reference(x, projs[0], dtype=f64, lora_input=x * m_g)
    gg = rl.lora_linear_reference(x, projs[1], dtype=f64, lora_input=x * m_u)
    h = torch.nn.functional.silu(e) * gg
    y64 = rl.lora_linear_reference(h, projs[2], dtype=f64, lora_input=h * m_d)
    want = grads_of(y64, x, projs, dy)
    errs = {"y": rel(y, y64)} | {k: rel(got[k], want[k]) for k in want}
    assert all(v < TOL[torch.float32] for v in errs.values()), errs


def test_only_middle_matrices_train_x_not_saved():
    # IntTune / late LaMDA: A and B frozen everywhere -> X is not needed (only e, g and the (T, r) products).
    fz = ("lora_A", "lora_B")
    projs = (
        proj("nf4dq", INTER, HID, 21, M=True, frozen=fz),
        proj("nf4dq", INTER, HID, 22, M=True, frozen=fz),
        proj("nf4dq", HID, INTER, 23, M=True, frozen=fz),
    )
    x = torch.randn(T, HID, device=DEVICE, requires_grad=True)
    y, saved = _record_saved(lambda: lora_mlp(x, gate=projs[0], up=projs[1], down=projs[2], backend="torch"))
    params = {t.data_ptr() for p in projs for t in p.factors() if t is not None}
    assert sum(t.nbytes for t in saved if t.data_ptr() not in params) == (2 * T * INTER + 3 * T * R) * 4
    y.sum().backward()
    assert all(p.lora_M.grad is not None and p.lora_A.grad is None for p in projs)
    check(projs, torch.float32, "torch", seed=24)


# ------------------------------------------------------------------------------------ GeGLU and packed gate_up


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gelu_tanh_nf4_variants_fp32(backend):
    projs = (
        proj("nf4dq", INTER, HID, 40, dora=True),
        proj("nf4dq", INTER, HID, 41, M=True),
        proj("nf4", HID, INTER, 42, bias=True),
    )
    check(projs, torch.float32, backend, seed=43, activation="gelu_tanh")


def test_gelu_tanh_fp16():
    projs = (proj("nf4dq", INTER, HID, 44), proj("nf4dq", INTER, HID, 45), proj("nf4dq", HID, INTER, 46, dora=True))
    check(projs, torch.float16, "triton", seed=47, activation="gelu_tanh")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_packed_gate_up_fp32(backend, activation):
    projs = (proj("nf4dq", 2 * INTER, HID, 48, dora=True, M=True), proj("nf4", HID, INTER, 49, bias=True))
    check(projs, torch.float32, backend, seed=50, activation=activation)


def test_packed_gate_up_fp16_plain_lora():
    check((proj("nf4dq", 2 * INTER, HID, 51), proj("nf4dq", HID, INTER, 52)), torch.float16, "triton", seed=53)


def test_matches_hf_phi3_and_gemma_mlps():
    """The split convention (gate = first half of gate_up) and the activation are HF's: same outputs as HF's
    Phi3MLP and Gemma2MLP on the same weights (no adapters)."""
    from transformers import Gemma2Config, Phi3Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(54)
    x = torch.randn(2, 5, 48)
    phi = Phi3MLP(Phi3Config(hidden_size=48, intermediate_size=40, hidden_act="silu"))
    gu, down = LoRAProjection(base=phi.gate_up_proj.weight), LoRAProjection(base=phi.down_proj.weight)
    y = lora_mlp(x, gate_up=gu, down=down)
    assert rel(y, phi(x)) < 1e-6
    gem = Gemma2MLP(Gemma2Config(hidden_size=48, intermediate_size=40, hidden_activation="gelu_pytorch_tanh"))
    y = lora_mlp(x, gate=LoRAProjection(base=gem.gate_proj.weight), up=LoRAProjection(base=gem.up_proj.weight),
                 down=LoRAProjection(base=gem.down_proj.weight), activation="gelu_tanh")
    assert rel(y, gem(x)) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_saves_x_and_one_gate_up_buffer_and_reuses_it(backend):
    gu, down = proj("nf4dq", 2 * INTER, HID, 55), proj("nf4dq", HID, INTER, 56)
    x0 = torch.randn(T, HID, device=DEVICE, requires_grad=True)
    x = x0 * 1.0
    y, saved = _record_saved(lambda: lora_mlp(x, gate_up=gu, down=down, backend=backend, inplace_input_grad=True))
    params = {t.data_ptr() for p in (gu, down) for t in p.factors() if t is not None}
    activ = [t for t in saved if t.data_ptr() not in params]
    # X + the (T, 2I) gate_up output + two (T, r) X Aᵀ: as much as separate gate/up save (one (T, r) less)
    assert sum(t.nbytes for t in activ) == (T * HID + 2 * T * INTER + 2 * T * R) * x.element_size()
    (eg,) = (t for t in activ if t.shape == (T, 2 * INTER))
    eg_val = eg.clone()
    dy = torch.randn(T, HID, device=DEVICE)
    y.backward(dy)
    e64, g64 = (t.double().requires_grad_() for t in eg_val.chunk(2, dim=-1))
    dh = (dy.double() @ down.base.dequantize(torch.float64)) + down.scale * (
        (dy.double() @ down.lora_B.double()) @ down.lora_A.double()
    )
    de, dg = torch.autograd.grad(torch.nn.functional.silu(e64) * g64, (e64, g64), dh)
    assert rel(eg, torch.cat((de, dg), dim=-1)) < 1e-5  # the buffer now holds d(gate_up output)
    assert rel(x, x0.grad) == 0.0  # dX was written into X's storage
    x64 = x0.detach().double().requires_grad_()
    want = torch.autograd.grad(lora_mlp_reference(x64, gate_up=gu, down=down), x64, dy.double())[0]
    assert rel(x0.grad, want) < 1e-5


def test_bad_arguments():
    gu, down = proj("dense", 2 * INTER, HID, 57), proj("dense", HID, INTER, 58)
    gate = proj("dense", INTER, HID, 59)
    x = torch.randn(3, HID, device=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        lora_mlp(x, gate=gate, up=gate, gate_up=gu, down=down)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, gate_up=gu, down=down, activation="relu")
    with pytest.raises(ValueError, match="required"):
        lora_mlp(x, gate=gate, down=down)
