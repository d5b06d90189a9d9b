"""SLoRA / NLoRA / IntTune: the formula, the Nyström init with a residual base, exports relative to the original."""

import json
import logging

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
    adapters = inject(model, cfg("nlora"))
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


def test_nlora_nf4_base_is_requantized_and_says_so(caplog):
    model = make_model("nf4")
    ref = logits(model, IDS)
    w_q = dense_weight(model.get_submodule(Q)).clone()
    with caplog.at_level(logging.INFO):
        adapters = inject(model, cfg("nlora"))
    assert "re-quantized" in caplog.text
    assert adapters[Q].base_layer.weight.quant_state is not None  # still 4-bit
    assert torch.isfinite(logits(model, IDS)).all() and not torch.equal(logits(model, IDS), ref)
    # The start differs from the NF4 base by one NF4 rounding of W_res = W − s·B N A: at most ~0.14 × the block
    # absmax per element. (With a poor Nyström approximation |W_res| can exceed |W| by far: so can that error.)
    a = adapters[Q]
    err = (a.merged_weight() - w_q).abs().max()
    assert 0 < err <= 0.15 * dense_weight(a.base_layer).abs().max()


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
