"""SoRA: the gated forward and its gradients against a float64 transcription, the proximal step after an optimizer
step (the paper's soft-threshold, once per step, also across a resume), the export that drops zeroed ranks (PEFT
loads it with the same logits), the fused path, training from the shipped recipe, exact resume, counts, estimate."""

import json

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.counts import trainable_counts
from slimtune.adapters.export import PEFT_CONFIG, export_peft, load_native, save_native
from slimtune.adapters.inject import inject
from slimtune.adapters.sora import soft_threshold

from adapter_helpers import tiny_base
from kind_training import (IDS, check_fused_equals_unfused, check_recipe_trains, check_resume_is_exact,
                           estimate_json, logits, randomize_b)
from test_counts import LLAMA2_7B, closed_form

Q = "model.layers.0.self_attn.q_proj"


def cfg(**kw):
    kw = {"rank": 6, "alpha": 12.0, "threshold": 0.1, **kw}
    return get_adapter_class("sora").Config(kind="sora", **kw)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_forward_and_gradients_match_float64_formula(quant):
    a = inject(tiny_base(quant), cfg())[Q]
    randomize_b({Q: a})
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, a.out_features)
    (a(x) * g).sum().backward()
    A, B, gate = (t.detach().double().requires_grad_() for t in (a.lora_A, a.lora_B, a.sora_gate))
    x64 = x.detach().double().requires_grad_()
    # the public code's LowRankLinear: ((x @ A.T) * gate @ B.T) * scaling
    y = x64 @ dense_weight(a.base_layer).double().t() + ((x64 @ A.t()) * gate @ B.t()) * (12.0 / 6)
    (y * g.double()).sum().backward()
    torch.testing.assert_close(a(x).detach().double(), y.detach(), rtol=1e-5, atol=1e-5)
    for ours, ref in ((a.lora_A.grad, A.grad), (a.lora_B.grad, B.grad), (a.sora_gate.grad, gate.grad),
                      (x.grad, x64.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_soft_threshold_is_the_papers_operator():
    xi = 0.1
    g = torch.tensor([-0.35, -0.15, -0.1, -0.05, 0.0, 0.04, 0.1, 0.15, 0.3], dtype=torch.float64)
    want = torch.tensor([-0.25, -0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.2], dtype=torch.float64)
    torch.testing.assert_close(soft_threshold(g, xi), want, rtol=0, atol=1e-12)
    # it is the proximal operator of ξ‖·‖₁: argmin_z ½(z − g)² + ξ|z| on a fine grid
    z = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    for gi, wi in zip(g, want):
        best = z[torch.argmin(0.5 * (z - gi) ** 2 + xi * z.abs())]
        assert abs(float(best - wi)) < 2e-5


def test_proximal_step_follows_the_optimizer_step_once(tmp_path):
    """An AdamW step, then on_step: g = T_ξ(g after Adam); replaying on_step for the same step (what a resumed trainer
    does) changes nothing; the step counter survives save/load."""
    model = tiny_base()
    adapters = inject(model, cfg())
    a = adapters[Q]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    after_adam = a.sora_gate.detach().double().clone()
    for ad in adapters.values():
        ad.on_step(1, 10)
    torch.testing.assert_close(a.sora_gate.detach().double(), soft_threshold(after_adam, 0.1), rtol=0, atol=1e-7)
    once = a.sora_gate.detach().clone()
    a.on_step(1, 10)  # replay: no second shrink
    assert torch.equal(a.sora_gate, once)
    save_native(model, tmp_path)
    fresh = tiny_base()
    b = load_native(fresh, tmp_path)[Q]
    b.on_step(1, 10)  # the resume replay
    assert torch.equal(b.sora_gate, once)
    b.on_step(2, 10)
    torch.testing.assert_close(b.sora_gate, soft_threshold(once, 0.1), rtol=0, atol=0)


def test_export_drops_zeroed_ranks(tmp_path):
    from peft import PeftModel

    model = tiny_base("nf4")
    adapters = inject(model, cfg())
    randomize_b(adapters)
    with torch.no_grad():
        adapters[Q].sora_gate[[1, 4]] = 0  # two ranks removed
        adapters["model.layers.0.mlp.up_proj"].sora_gate.zero_()  # every rank removed
    ours = logits(model)
    export_peft(model, tmp_path)
    peft_cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert peft_cfg["r"] == 6 and peft_cfg["rank_pattern"] == {Q: 4, "model.layers.0.mlp.up_proj": 1}
    peft_model = PeftModel.from_pretrained(tiny_base("nf4"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-4, atol=1e-4)


def test_fused_path_equals_unfused():
    def inject_random(model):
        randomize_b(inject(model, cfg()))

    check_fused_equals_unfused(lambda: tiny_base("nf4", layers=2), inject_random)


def test_recipe_trains_prunes_and_exports_a_smaller_lora(tmp_path):
    t = check_recipe_trains("sora_smollm2_udhr", tmp_path, factor=0.985)  # measured: 1572 -> 1535
    zeroed = sum(int((a.sora_gate == 0).sum()) for a in t.adapters.values())
    assert 0 < zeroed < 8 * len(t.adapters)  # measured: 33 of 112
    export_peft(t.model, tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    ranks = [peft_cfg["rank_pattern"].get(n, peft_cfg["r"]) for n in t.adapters]
    assert sum(ranks) == sum(max(1, int((a.sora_gate != 0).sum())) for a in t.adapters.values()) < 8 * len(ranks)


def test_resume_is_exact(tmp_path):
    check_resume_is_exact("sora_smollm2_udhr", tmp_path)


def test_counts_and_estimate():
    assert trainable_counts(LLAMA2_7B, "sora", 16) == closed_form("lora", 16) + 32 * 7 * 16  # + the gates
    trainable_counts(LLAMA2_7B, "sora", 16, at_end=True)  # on_step on the meta device is a no-op
    est = estimate_json("sora_smollm2_udhr")
    assert est["adapter_params"] == 30 * (8 * (2 * 1152 + 2 * 768 + 3 * 2112) + 7 * 8)  # SmolLM2-135M at r 8
    assert est["fused"] and est["unfused"] == []
