"""RoPE: Triton kernel (interpreter) and torch reference vs HF's apply_rotary_pos_emb (fp64 truth)."""

import pytest
import torch
from kernel_helpers import rel as _rel
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from slimtune.kernels.rope import rope_triton
from slimtune.ops.rope import rope, rope_ref


def _cos_sin(B, T, HQ, HK, D, dtype):
    cfg = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D)
    pos = (torch.arange(T)[None] + torch.randint(0, 50, (B, 1))).contiguous()  # per-row offsets
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float64), pos)
    return cos, sin  # (B, T, D) fp64


def _hf(q, k, cos, sin):
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qr.transpose(1, 2), kr.transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("flat,inplace", [(False, False), (True, True), (False, True)])
def test_rope_forward_backward(backend, dtype, tol, flat, inplace, poisoned):
    B, T, HQ, HK, D = 2, 37, 6, 2, 20  # odd T, non-power-of-two heads and half dim (10)
    cos, sin = _cos_sin(B, T, HQ, HK, D, dtype)
    qkv = torch.randn(B, T, (HQ + 2 * HK) * D, dtype=dtype, requires_grad=True)
    gq, gk = torch.randn(B, T, HQ, D, dtype=dtype), torch.randn(B, T, HK, D, dtype=dtype)
    # truth: HF's formula in fp64
    q64 = qkv.detach().double()[..., : HQ * D].reshape(B, T, HQ, D).requires_grad_()
    k64 = qkv.detach().double()[..., HQ * D : (HQ + HK) * D].reshape(B, T, HK, D).requires_grad_()
    tq, tk = _hf(q64, k64, cos, sin)
    tdq, tdk = torch.autograd.grad((tq * gq.double()).sum() + (tk * gk.double()).sum(), (q64, k64))

    h = qkv * 1  # non-leaf, as a projection output
    if flat:  # flat (B, T, H*D) tensors: the in-place path
        q, k = h[..., : HQ * D].clone(), h[..., HQ * D : (HQ + HK) * D].clone()
        qr, kr = rope(q, k, cos=cos.to(dtype), sin=sin.to(dtype), head_dim=D, inplace=inplace, backend=backend)
        if inplace:
            assert qr.data_ptr() == q.data_ptr() and kr.data_ptr() == k.data_ptr()
        qr, kr = qr.view(B, T, HQ, D), kr.view(B, T, HK, D)
    else:  # strided views of the fused projection output (falls back to out of place)
        q = h[..., : HQ * D].view(B, T, HQ, D)
        k = h[..., HQ * D : (HQ + HK) * D].view(B, T, HK, D)
        qr, kr = rope(q, k, cos=cos.to(dtype), sin=sin.to(dtype), inplace=inplace, backend=backend)
    (dqkv,) = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum(), (qkv,))
    assert _rel(qr, tq) < tol and _rel(kr, tk) < tol
    assert _rel(dqkv[..., : HQ * D].reshape(B, T, HQ, D), tdq) < tol
    assert _rel(dqkv[..., HQ * D : (HQ + HK) * D].reshape(B, T, HK, D), tdk) < tol
    assert (dqkv[..., (HQ + HK) * D :] == 0).all()


def test_rope_triton_poisoned_outputs_and_broadcast_cos():
    B, T, HQ, HK, D = 3, 5, 4, 1, 64
    cos, sin = _cos_sin(1, T, HQ, HK, D, torch.float32)  # batch 1, broadcast over B
    cos, sin = cos.float(), sin.float()
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, HK, D)
    for backward in (False, True):
        qo = torch.full_like(q, float("nan"))
        ko = torch.full_like(k, float("nan"))
        rope_triton(q, k, qo, ko, cos, sin, backward=backward)
        assert _rel(qo, rope_ref(q, cos, sin, backward=backward)) < 1e-6
        assert _rel(ko, rope_ref(k, cos, sin, backward=backward)) < 1e-6
    # backward is the inverse rotation
    qo = torch.empty_like(q)
    rope_triton(rope_ref(q, cos, sin), k.clone(), qo, torch.empty_like(k), cos, sin, backward=True)
    assert _rel(qo, q) < 1e-5


def test_rope_leaf_requiring_grad_runs_out_of_place():
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, requires_grad=True)
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    qr, kr = rope(q, k, cos=cos, sin=sin, inplace=True, backend="torch")
    assert qr.data_ptr() != q.data_ptr() and torch.equal(qr, q)
