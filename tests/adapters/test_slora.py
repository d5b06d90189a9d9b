"""SLoRA / NLoRA / IntTune: the formula, the Nyström init with a residual base, exports relative to the original."""

import json

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.export import export_peft
from slimtune.adapters.inject import inject, unload

from adapter_helpers import tiny_base

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"


def make_model(quant="none", seed=0, layers=1):
    return tiny_base(quant, seed, layers)


def cfg(kind, **kw):
    return get_adapter_class(kind).Config(kind=kind, rank=kw.pop("rank", 8), alpha=kw.pop("alpha", 16.0), **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_slora_formula_and_init():
    model = make_model()
    a = inject(model, cfg("slora"))[Q]
    assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.lora_N) > 0
    assert a.trainable_names() == [n for n, _ in a.named_parameters() if not n.startswith("base_layer.")]
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(5, 64)
    w = dense_weight(a.base_layer)
    want = x @ w.t() + 2.0 * x @ (a.lora_B @ a.lora_N @ a.lora_A).t()
    torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)


def test_nlora_nystrom_init_and_residual_base():
    model = make_model()
    w = {n: dense_weight(m).clone() for n, m in model.named_modules() if n.endswith("_proj")}
    ref = logits(model, IDS)
    adapters = inject(model, cfg("nlora", balance=False, residual="base"))  # raw Nyström factors (balance: test_nlora_lr.py)
    for name in (Q, DOWN):
        a, w0 = adapters[name], w[name]
        assert torch.equal(a.lora_B, w0[:, :8]) and torch.equal(a.lora_A, w0[:8, :])
        torch.testing.assert_close(a.lora_N, torch.linalg.pinv(w0[:8, :8].double()).float())
        w_res = w0 - 2.0 * a.lora_B @ a.lora_N @ a.lora_A
        torch.testing.assert_close(dense_weight(a.base_layer), w_res, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.merged_weight(), w0, atol=1e-6, rtol=0)  # W_res + s B N A = W
        assert a.trainable_names() == ["lora_A", "lora_N", "lora_B"]
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)  # starts at the original model
    unload(model)
    for name, m in model.named_modules():
        if name in w:
            torch.testing.assert_close(m.weight, w[name], atol=4e-6, rtol=0)  # unload adds the residual back (W - sBNA + sBNA: fp32 rounding of the product, ~1e-6)


@pytest.mark.parametrize("quant, dtype", [("nf4", None), ("none", torch.bfloat16)])
def test_residual_base_is_refused_on_lossy_bases(quant, dtype):
    """W − s·B₀N₀A₀ re-rounded to 4 or 16 bits moves the start far off (the Nyström term is 3-25x W): refused with a
    one-line reason; the default (residual: adapter) is exact there."""
    model = make_model(quant)
    if dtype is not None:
        model = model.to(dtype)
    for kind in ("nlora", "inttune"):
        with pytest.raises(ValueError, match="residual: base needs an fp32 base") as e:
            inject(make_model(quant).to(dtype) if dtype else make_model(quant), cfg(kind, residual="base"))
        assert "\n" not in str(e.value)
    assert get_adapter_class("nlora").Config(kind="nlora", rank=8).residual == "adapter"
    ref = logits(model, IDS)
    inject(model, cfg("nlora"))
    assert torch.equal(logits(model, IDS), ref)


def test_nlora_as_released():
    model = make_model()
    w = dense_weight(model.get_submodule(Q)).clone()
    ref = logits(model, IDS)
    a = inject(model, cfg("nlora", init="as_released"))[Q]
    assert torch.equal(a.lora_N, w[:8, :8]) and torch.equal(dense_weight(a.base_layer), w)  # N = U, no residual
    assert not hasattr(a, "nlora_A0")
    assert not torch.allclose(logits(model, IDS), ref, atol=1e-3)  # the public code does not start at the base


def test_nlora_export_is_rank_2r_relative_to_the_original(tmp_path):
    from peft import PeftModel

    model = make_model()
    w = dense_weight(model.get_submodule(Q)).clone()
    adapters = inject(model, cfg("nlora"))
    with torch.no_grad():
        for a in adapters.values():
            for p in (a.lora_A, a.lora_N, a.lora_B):
                p.add_(torch.randn_like(p) * 0.05)
    a = adapters[Q]
    f = a.peft_factors()
    assert f.rank == 16 and f.alpha == 16.0
    delta = 2.0 * (a.lora_B @ a.lora_N @ a.lora_A - a.nlora_B0 @ a.nlora_N0 @ a.nlora_A0)  # s·(B N A − B₀N₀A₀)
    torch.testing.assert_close(f.B @ f.A, delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.merged_weight(), w + delta, atol=1e-5, rtol=1e-5)  # merge: original + change
    ours = logits(model, IDS)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 16
    peft_model = PeftModel.from_pretrained(make_model(), str(tmp_path / "peft")).eval()  # the ORIGINAL base
    torch.testing.assert_close(logits(peft_model, IDS), ours, rtol=1e-4, atol=1e-4)


def test_inttune_trains_only_n(tmp_path):
    from peft import PeftModel

    model = make_model()
    ref = logits(model, IDS)
    adapters = inject(model, cfg("inttune"))
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)
    frozen = {n: (a.lora_A.clone(), a.lora_B.clone(), a.lora_N.clone()) for n, a in adapters.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(adapters) and all(p.shape == (8, 8) for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        for a in adapters.values():
            a.on_step(step, 3)
    for n, a in adapters.items():
        A0, B0, N0 = frozen[n]
        assert torch.equal(a.lora_A, A0) and torch.equal(a.lora_B, B0)  # bit-identical after training
        assert not torch.equal(a.lora_N, N0)
        assert a.lora_A.grad is None and a.lora_B.grad is None
    a = adapters[Q]
    f = a.peft_factors()  # rank r, not 2r: A and B never moved
    assert f.rank == 8
    torch.testing.assert_close(f.B @ f.A, 2.0 * a.lora_B @ (a.lora_N - a.inttune_N0) @ a.lora_A)
    ours = logits(model, IDS)
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, IDS), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["nlora", "inttune"])
def test_residual_in_adapter_is_exact_on_nf4(kind, tmp_path):
    from peft import PeftModel

    model = make_model("nf4")
    ref = logits(model, IDS)
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if n.endswith("_proj")}
    adapters = inject(model, cfg(kind, residual="adapter"))
    for n, a in adapters.items():
        assert torch.equal(a.base_layer.weight.data, packed[n])  # the base is untouched
        assert torch.count_nonzero(a.delta_weight()) == 0  # every term is exactly zero at init
    assert torch.equal(logits(model, IDS), ref)  # a bit-exact start, even on NF4
    a = adapters[Q]
    w_q = dense_weight(a.base_layer).clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(1, 3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    bna = a.lora_B @ a.lora_N @ a.lora_A
    if kind == "nlora":
        b0n0a0 = a.nlora_B0 @ a.nlora_N0 @ a.nlora_A0
        assert a.factors().A.shape == (24, 64)  # rank 3r
    else:
        b0n0a0 = a.lora_B @ a.inttune_N0 @ a.lora_A
        assert torch.equal(a.factors().A, a.lora_A)  # rank r: s·B (N − N₀) A
    torch.testing.assert_close(a.delta_weight(), 2.0 * (bna - b0n0a0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.merged_weight(), w_q + 2.0 * (bna - b0n0a0), atol=1e-6, rtol=1e-5)
    f = a.peft_factors()
    torch.testing.assert_close(f.B @ f.A, a.delta_weight(), atol=1e-6, rtol=1e-5)
    ours = logits(model, IDS)
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model("nf4"), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, IDS), ours, rtol=1e-4, atol=1e-4)  # same NF4 base: tight


def test_nystrom_rank_must_fit():
    with pytest.raises(ValueError, match="rank"):
        inject(make_model(), cfg("nlora", rank=40, targets=["k_proj"]))  # k_proj is (32, 64)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_nlora_peft_export_is_exact_against_float64(quant):
    """The rank-2r PEFT export, evaluated the way PEFT does (fp32: (x Aᵀ) Bᵀ), against the float64 update."""
    model = make_model(quant)
    a = inject(model, cfg("nlora", balance=False))[DOWN]  # unbalanced factors: the largest cancellation
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (a.lora_A, a.lora_N, a.lora_B):
            p.add_(torch.randn(p.shape, generator=g) * 1e-3 * p.abs().mean())
    x = torch.randn(16, a.in_features, generator=g)
    A, N, B = (t.detach().double() for t in (a.lora_A, a.lora_N, a.lora_B))
    A0, N0, B0 = (t.double() for t in (a.nlora_A0, a.nlora_N0, a.nlora_B0))
    want = x.double() @ (a.scale * (B @ N @ A - B0 @ N0 @ A0)).t()  # (16, out) float64
    f = a.peft_factors()
    got = (x @ f.A.t()) @ f.B.t()  # PEFT's fp32 path
    rel = float((got.double() - want).abs().max() / want.abs().max())
    naive_b = torch.cat([a.scale * (a.lora_B @ a.lora_N), -a.scale * (a.nlora_B0 @ a.nlora_N0)], dim=1).detach()
    naive = (x @ torch.cat([a.lora_A, a.nlora_A0]).detach().t()) @ naive_b.t()  # the old [sBN, −sB₀N₀]·[A; A₀]
    naive_rel = float((naive.double() - want).abs().max() / want.abs().max())
    assert rel < 1e-5 and rel < naive_rel / 10, (rel, naive_rel)


@pytest.mark.parametrize("kind, extra", [("nlora", {"residual": "base"}), ("nlora", {}), ("inttune", {})])
def test_load_never_reruns_the_nystrom_init(kind, extra, tmp_path, monkeypatch):
    from slimtune.adapters import slora
    from slimtune.adapters.export import load_native, save_native

    model = make_model()
    adapters = inject(model, cfg(kind, **extra))
    with torch.no_grad():
        for ad in adapters.values():
            ad.lora_N.add_(0.01)
    ours = logits(model, IDS)
    save_native(model, tmp_path / "native")

    def no_init(*a, **k):
        raise AssertionError("the Nyström init ran during a load")

    monkeypatch.setattr(slora, "nystrom_factors", no_init)
    fresh = make_model()
    load_native(fresh, tmp_path / "native")
    torch.testing.assert_close(logits(fresh, IDS), ours, rtol=1e-5, atol=1e-5)
