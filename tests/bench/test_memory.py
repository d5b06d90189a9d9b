"""saved_bytes on cases whose saved tensors are known exactly."""

import torch
import torch.nn as nn

from slimtune.bench.memory import per_token_per_layer, saved_bytes


def test_chain_with_known_saved_tensors():
    n = 1000
    x = torch.randn(n, requires_grad=True)

    def fn():
        y = torch.exp(x)  # saves its result y (4n bytes)
        z = torch.sin(y)  # saves y again: same storage, counted once
        w = z * 2.0  # scalar multiply: saves nothing
        v = x.pow(2)  # saves x (4n bytes), a leaf: still an activation here (no modules given)
        return (w + v[:n]).sum()  # add/sum save no tensors

    r = saved_bytes(fn)
    assert r.activation_bytes == 2 * 4 * n
    assert r.param_bytes == 0 and r.n_storages == 2 and r.n_saved == 3


def test_views_count_their_whole_storage_once():
    x = torch.randn(64, 32, requires_grad=True)

    def fn():
        h = x * 1.0  # saves nothing (scalar)
        a = torch.tanh(h[:, :16])  # tanh saves its own output (64x16), a fresh storage
        b = h[:8] ** 2  # saves a view of h: the whole 64x32 storage counts, once
        c = h[8:] ** 3  # another view of h: deduplicated
        return a.sum() + b.sum() + c.sum()

    r = saved_bytes(fn)
    assert r.activation_bytes == 64 * 16 * 4 + 64 * 32 * 4


def test_parameters_counted_apart():
    lin = nn.Linear(20, 30, bias=True)
    x = torch.randn(5, 20, requires_grad=True)
    r = saved_bytes(lambda: lin(x).sum(), modules=[lin])
    assert r.activation_bytes == 5 * 20 * 4  # the input
    assert r.param_bytes == 30 * 20 * 4  # the weight (saved to compute dx); bias needs nothing
    r2 = saved_bytes(lambda: lin(x).sum())
    assert r2.activation_bytes == 5 * 20 * 4 + 30 * 20 * 4


def test_per_token_per_layer_cancels_model_terms():
    tokens, width = 10, 8

    def measure(n_layers):
        torch.manual_seed(0)
        x = torch.randn(tokens, width, requires_grad=True)

        def fn():
            h = torch.exp(x)  # per-model term: 4·T·W bytes
            for _ in range(n_layers):
                h = torch.tanh(h) * 1.0  # per layer: tanh saves its output (4·T·W)
            return h.sum()

        return saved_bytes(fn)

    assert per_token_per_layer(measure, layers=3, tokens=tokens) == 4 * width


def test_saved_bytes_bench_meets_target():
    """bench/saved_bytes.py on a small config: the fused path saves <= 0.4x of HF + PEFT per token per layer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "saved_bytes.py"
    spec = importlib.util.spec_from_file_location("saved_bytes_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    H, inter, heads, kv, r = 128, 344, 4, 2, 16
    out = bench.main(["--hidden", str(H), "--intermediate", str(inter), "--heads", str(heads), "--kv-heads", str(kv),
                      "--layers", "1", "--seq", "32", "--vocab", "200", "--rank", str(r)])
    assert out["ratio"] <= 0.4
    assert not [line for line in out["slimtune"]["fuse_report"] if line.startswith("not fused")]
    # What the fused layer may keep, per token (bf16): the two norm outputs (shared with the q/k/v and MLP inputs),
    # e and g of the MLP, SDPA's q, k, v and output (the output is also o_proj's input), one (r,) X Aᵀ per adapter,
    # SDPA's fp32 logsumexp per head and the norms' fp32 rstd.
    hq, hkv = H, H // heads * kv
    bound = 2 * (2 * H + 2 * inter + 2 * hq + 2 * hkv + 7 * r) + 4 * heads + 2 * 4
    assert out["slimtune"]["bytes_per_token_per_layer"] <= bound
