"""NOLA: the formula against a float64 transcription, regenerated (never stored) bases, the fused path, training from
the shipped recipe, exact resume, parameter counts, the estimate, PEFT export."""

import math

import pytest
import torch
from transformers import LlamaConfig

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.counts import trainable_counts
from slimtune.adapters.export import NATIVE_WEIGHTS, export_peft, load_native, save_native
from slimtune.adapters.inject import inject
from slimtune.adapters.nola import STREAM_A, STREAM_A0, STREAM_B, basis_chunk, uniform_stream

from adapter_helpers import tiny_base
from kind_training import check_fused_equals_unfused, check_recipe_trains, check_resume_is_exact, estimate_json

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"


def cfg(**kw):
    kw = {"rank": 4, "alpha": 8.0, "num_basis_a": 10, "num_basis_b": 7, **kw}
    return get_adapter_class("nola").Config(kind="nola", **kw)


def randomize(adapters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.nola_alpha.copy_(torch.randn(a.nola_alpha.shape, generator=g))
            a.nola_beta.copy_(torch.randn(a.nola_beta.shape, generator=g))


def test_uniform_stream_is_a_pure_function_of_seed_and_index():
    full = uniform_stream(7, STREAM_A, 0, 50_000)
    assert torch.equal(uniform_stream(7, STREAM_A, 123, 1000), full[123:1123])  # any slice regenerates alone
    assert torch.equal(uniform_stream(7, STREAM_A, 2**33, 10), uniform_stream(7, STREAM_A, 2**33, 10))
    assert not torch.equal(uniform_stream(8, STREAM_A, 0, 1000), full[:1000])  # another seed
    assert not torch.equal(uniform_stream(7, STREAM_B, 0, 1000), full[:1000])  # another stream
    assert not torch.equal(uniform_stream(7, STREAM_A, 2**32, 1000), full[:1000])  # high index bits matter
    assert full.min() >= -1 and full.max() < 1
    assert abs(float(full.mean())) < 0.01 and abs(float(full.var()) - 1 / 3) < 0.01  # uniform on [-1, 1)
    c = torch.corrcoef(torch.stack([full[:-1], full[1:]]))[0, 1]
    assert abs(float(c)) < 0.02  # neighbours uncorrelated


def reference(a, x, g, w):
    """The paper's formula in float64, every basis materialised: A = A0 + Σ α_i U_i/√k, B = Σ β_j V_j/√l,
    y = W x + s·B A x. The authors' GenerateParams builds the same sum (einsum('b,boi->oi', coef, U/√k))."""
    k, l, r = a.config.num_basis_a, a.config.num_basis_b, a.config.rank
    alpha = a.nola_alpha.detach().double().requires_grad_()
    beta = a.nola_beta.detach().double().requires_grad_()
    u = basis_chunk(a.seed, STREAM_A, 0, k, r * a.in_features, "cpu").double().view(k, r, a.in_features)
    v = basis_chunk(a.seed, STREAM_B, 0, l, a.out_features * r, "cpu").double().view(l, a.out_features, r)
    a0 = uniform_stream(a.seed, STREAM_A0, 0, r * a.in_features).double().view(r, a.in_features)
    a0 = a0 / math.sqrt(a.in_features)  # kaiming-uniform(a=√5): ±1/√in
    big_a = a0 + torch.einsum("b,bri->ri", alpha, u) / math.sqrt(k)
    big_b = torch.einsum("b,bor->or", beta, v) / math.sqrt(l)
    x64 = x.detach().double().requires_grad_()
    y = x64 @ w.double().t() + (a.config.alpha / r) * x64 @ big_a.t() @ big_b.t()
    (y * g).sum().backward()
    return y, alpha.grad, beta.grad, x64.grad


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_forward_and_gradients_match_float64_formula(quant):
    model = tiny_base(quant)
    adapters = inject(model, cfg())
    randomize(adapters)
    for name in (Q, DOWN):
        a = adapters[name]
        x = torch.randn(5, a.in_features, requires_grad=True)
        g = torch.randn(5, a.out_features)
        y = a(x)
        (y * g).sum().backward()
        y_ref, d_alpha, d_beta, d_x = reference(a, x, g, dense_weight(a.base_layer))
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.nola_alpha.grad.double(), d_alpha, rtol=1e-4, atol=1e-5)  # fp32 sums
        torch.testing.assert_close(a.nola_beta.grad.double(), d_beta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), d_x, rtol=1e-5, atol=1e-5)


def test_chunked_generation_equals_one_chunk(monkeypatch):
    import slimtune.adapters.nola as nola

    a = inject(tiny_base(), cfg(num_basis_a=9))[Q]
    randomize({Q: a})
    whole = a.factors()
    loss = (whole.A.sum() + whole.B.pow(2).sum())
    grads = torch.autograd.grad(loss, [a.nola_alpha, a.nola_beta])
    monkeypatch.setattr(nola, "CHUNK_VALUES", 3 * a.in_features * a.config.rank)  # 3 bases per chunk: 9 = 3 chunks
    a._cache = None  # regenerate the forward's sums too
    part = a.factors()
    torch.testing.assert_close(part.A, whole.A, rtol=0, atol=1e-6)
    grads2 = torch.autograd.grad(part.A.sum() + part.B.pow(2).sum(), [a.nola_alpha, a.nola_beta])
    for x, y in zip(grads, grads2):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_init_only_coefficients_train_and_bases_are_never_stored(tmp_path):
    model = tiny_base()
    adapters = inject(model, cfg())
    a = adapters[Q]
    assert a.trainable_names() == ["nola_alpha", "nola_beta"]
    assert torch.count_nonzero(a.nola_alpha) == 0 and torch.count_nonzero(a.nola_beta) == 0
    f = a.factors()
    assert torch.count_nonzero(f.B) == 0 and f.A.abs().max() <= 1 / math.sqrt(a.in_features)  # A = A0 (kaiming)
    assert {n for n, _ in a.state_dict().items() if not n.startswith("base_layer.")} == {"nola_alpha", "nola_beta"}
    assert adapters[Q].seed != adapters["model.layers.0.self_attn.k_proj"].seed  # each module its own bases
    randomize(adapters)
    stale = a.factors().A.detach().clone()
    with torch.no_grad():
        a.nola_alpha.add_(1.0)  # what an optimizer step does: the cached sums must follow
    moved = a.factors().A.detach()
    a._cache = None
    torch.testing.assert_close(moved, a.factors().A.detach(), rtol=0, atol=0)
    assert not torch.allclose(moved, stale)
    save_native(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / NATIVE_WEIGHTS))
    assert sum(t.numel() for t in saved.values()) == len(adapters) * (10 + 7)  # coefficients only
    fresh = tiny_base()
    load_native(fresh, tmp_path)
    b = fresh.get_submodule(Q)
    torch.testing.assert_close(b.factors().A, a.factors().A, rtol=0, atol=0)  # regenerated from the saved seeds


def test_peft_export_is_the_materialised_lora(tmp_path):
    from peft import PeftModel

    model = tiny_base("nf4")
    adapters = inject(model, cfg())
    randomize(adapters)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_base("nf4"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_fused_path_equals_unfused():
    def inject_random(model):
        randomize(inject(model, cfg()))

    check_fused_equals_unfused(lambda: tiny_base("nf4", layers=2), inject_random)


def test_recipe_trains_on_the_fused_nf4_path(tmp_path):
    t = check_recipe_trains("nola_smollm2_udhr", tmp_path, factor=0.99)  # measured: 1572 -> 1543 (128 values/module)
    assert all(torch.count_nonzero(a.nola_alpha) > 0 for a in t.adapters.values())


def test_resume_is_exact(tmp_path):
    check_resume_is_exact("nola_smollm2_udhr", tmp_path)


def test_counts_and_estimate():
    llama2_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000)
    # k + l per module, whatever the rank and shape: 7 modules x 32 layers x 256 (k = l = 128 by default)
    assert trainable_counts(llama2_7b, "nola", 8) == 32 * 7 * 256
    assert trainable_counts(llama2_7b, "nola", 64, num_basis_a=10, num_basis_b=5, targets=["q_proj"]) == 32 * 15
    est = estimate_json("nola_smollm2_udhr")
    assert est["adapter_params"] == 30 * 7 * (64 + 64)  # SmolLM2-135M: 30 layers x 7 modules x (k + l)
    assert est["fused"] and est["unfused"] == [] and est["total_bytes"] > 0
