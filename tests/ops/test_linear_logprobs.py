"""linear_token_logprobs against a plain torch log_softmax over the whole logits, on odd shapes: values and
gradients (w.r.t. x, a trainable head and bias), the streamed NF4 head against the same dequantized weights,
softcap, ignored rows, and the largest tensor alive being one vocabulary block."""


import pytest
import torch
import torch.nn.functional as F

from slimtune.ops.linear_logprobs import linear_token_logprobs
from slimtune.ops.nf4 import quantize_4bit


def _case(T, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.randperm(T, generator=g)[: T // 4]] = -100
    up = torch.randn(T, generator=g, dtype=torch.float64)  # a different upstream gradient per row
    return x, w, b, t, up


def _ref(x, w, b, t, softcap=None):
    z = F.linear(x, w, b)  # (T, V)
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z, dim=-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(t != -100, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("head_trains", [False, True])
def test_values_and_grads_match_log_softmax(softcap, head_trains):
    x, w, b, t, up = _case(37, 200, 136, 1 + head_trains)
    xs, ws, bs = (v.clone().requires_grad_(head_trains or v is x) for v in (x, w, b))
    xr, wr, br = (v.clone().requires_grad_(head_trains or v is x) for v in (x, w, b))
    got = linear_token_logprobs(xs, ws, t, bias=bs, chunk_size=8, softcap=softcap, backend="torch")
    want = _ref(xr, wr, br, t, softcap)
    assert torch.allclose(got.double(), want, atol=1e-12, rtol=1e-10)
    assert (got[t == -100] == 0).all()
    (got * up).sum().backward()
    (want * up).sum().backward()
    assert torch.allclose(xs.grad, xr.grad, atol=1e-12, rtol=1e-9)
    if head_trains:
        assert torch.allclose(ws.grad, wr.grad, atol=1e-12, rtol=1e-9)
        assert torch.allclose(bs.grad, br.grad, atol=1e-12, rtol=1e-9)


def test_batched_3d_fp32():
    x, w, b, t, up = _case(2 * 19, 48, 301, 3)
    x3, t3, up3 = x.float().view(2, 19, 48), t.view(2, 19), up.float().view(2, 19)
    xs = x3.clone().requires_grad_()
    got = linear_token_logprobs(xs, w.float(), t3, backend="torch")
    assert got.shape == (2, 19) and got.dtype == torch.float32
    (got * up3).sum().backward()
    xr = x.clone().requires_grad_()
    want = _ref(xr, w, None, t)
    (want * up).sum().backward()
    assert torch.allclose(got.double().view(-1), want, atol=1e-5)
    assert torch.allclose(xs.grad.double().view(-1, 48), xr.grad, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_streamed_nf4_head(softcap):
    """The 4-bit head streamed in 96-row blocks (601 rows: a short last one) == log_softmax on its dequantized
    weights, values and dx, with a different upstream gradient per token."""
    x, _, _, t, up = _case(23, 64, 601, 7)
    g = torch.Generator().manual_seed(8)
    w = quantize_4bit(torch.randn(601, 64, generator=g) * 0.3, double_quant=True)
    xs = x.float().clone().requires_grad_()
    got = linear_token_logprobs(xs, w, t, vocab_block=128, chunk_size=7, softcap=softcap, backend="torch")
    (got * up.float()).sum().backward()
    xr = x.clone().requires_grad_()
    want = _ref(xr, w.dequantize(torch.float32).double(), None, t, softcap)
    (want * up).sum().backward()
    assert torch.allclose(got.double(), want, atol=2e-5)
    assert torch.allclose(xs.grad.double(), xr.grad, atol=2e-5)


def test_streamed_head_largest_tensor_is_one_block():
    """No (T, V) tensor: the largest storage made during forward + backward is one (block, H) weight block."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for o in (out if isinstance(out, (tuple, list)) else (out,)):  # new storages only (not views of inputs)
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                    Largest.largest = max(Largest.largest, o.untyped_storage().nbytes())
            return out

    T, H, V, block = 17, 64, 2999, 256
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=g).requires_grad_()
    w = quantize_4bit(torch.randn(V, H, generator=g) * 0.3, double_quant=True)
    t = torch.randint(0, V, (T,), generator=g)
    with Largest():
        lp = linear_token_logprobs(x, w, t, vocab_block=block, chunk_size=8, backend="torch")
        lp.sum().backward()
    assert Largest.largest == block * H * 4 < T * V * 4
