"""KaSA: the truncation of the r smallest singular triplets and the SVD-form update against a float64 transcription
(forward, every gradient), the regularisers (formula, and the trainer adds them once per optimizer step), the fused
path, the rank-2r PEFT export, training from the shipped recipe, exact resume, counts and the estimate."""

import contextlib
import json

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.counts import trainable_counts
from slimtune.adapters.export import PEFT_CONFIG, export_peft, load_native, save_native
from slimtune.adapters.inject import inject
from slimtune.train.callbacks import TrainerCallback

from adapter_helpers import tiny_base
from kind_training import (check_fused_equals_unfused, check_recipe_trains, check_resume_is_exact, estimate_json,
                           logits, randomize_b, trainer)
from test_counts import LLAMA2_7B, closed_form

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"  # (128, 64): out > in
DOWN = "model.layers.0.mlp.down_proj"  # (64, 136): out < in


def cfg(**kw):
    kw = {"rank": 4, "alpha": 8.0, "beta": 0.3, "gamma": 0.2, **kw}
    return get_adapter_class("kasa").Config(kind="kasa", **kw)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_truncation_is_the_r_smallest_triplets(quant):
    model = tiny_base(quant)
    w = {n: dense_weight(m).clone() for n, m in model.named_modules() if n.endswith("_proj")}
    adapters = inject(model, cfg())
    for name in (Q, DOWN):
        a = adapters[name]
        w64 = w[name].double()
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        k = min(w64.shape)
        small = u[:, k - 4 :] @ torch.diag(s[k - 4 :]) @ vh[k - 4 :]  # the last 4 triplets (sign-free product)
        torch.testing.assert_close(a.kasa_US.double() @ a.kasa_Vh.double(), small, rtol=0, atol=1e-6)
        w_base = a.merged_weight().double()  # B = 0 at init: the truncated base
        torch.testing.assert_close(w_base, w64 - small, rtol=0, atol=1e-5)
        # Eckart–Young: the truncation error is exactly the r smallest singular values
        torch.testing.assert_close((w64 - w_base).norm() ** 2, (s[k - 4 :] ** 2).sum(), rtol=1e-5, atol=0)
        assert torch.equal(dense_weight(a.base_layer), w[name])  # the (4-bit) base itself is never rewritten
        assert torch.count_nonzero(a.lora_B) == 0 and a.trainable_names() == ["lora_A", "lora_B", "kasa_sigma"]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_forward_and_gradients_match_float64_formula(quant):
    adapters = inject(tiny_base(quant), cfg())
    randomize_b(adapters)
    for name in (K, DOWN):
        a = adapters[name]
        w64 = dense_weight(a.base_layer).double()
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        k = min(w64.shape)
        w_base = u[:, : k - 4] @ torch.diag(s[: k - 4]) @ vh[: k - 4]  # the top k - r triplets
        x = torch.randn(5, a.in_features, requires_grad=True)
        g = torch.randn(5, a.out_features)
        (a(x) * g).sum().backward()
        A, B, sig = (t.detach().double().requires_grad_() for t in (a.lora_A, a.lora_B, a.kasa_sigma))
        x64 = x.detach().double().requires_grad_()
        y = x64 @ w_base.t() + 2.0 * x64 @ (B @ torch.diag(sig) @ A).t()
        (y * g.double()).sum().backward()
        torch.testing.assert_close(a(x).detach().double(), y.detach(), rtol=1e-5, atol=1e-5)
        for ours, ref in ((a.lora_A.grad, A.grad), (a.lora_B.grad, B.grad), (a.kasa_sigma.grad, sig.grad),
                          (x.grad, x64.grad)):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_regularization_matches_the_formula():
    """(β Σ‖Δσ‖² + γ Σ (‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)) / M with ΔU = B, ΔVᵀ = A (r × r Gram matrices)."""
    adapters = inject(tiny_base(), cfg())
    randomize_b(adapters)
    cls = get_adapter_class("kasa")
    reg = cls.regularization(list(adapters.values()))
    want = torch.zeros((), dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    for a in adapters.values():
        A, B, sig = a.lora_A.double(), a.lora_B.double(), a.kasa_sigma.double()
        want = want + 0.3 * (sig**2).sum() + 0.2 * ((B.t() @ B - eye).norm() + (A @ A.t() - eye).norm())
    torch.testing.assert_close(reg.double(), want / len(adapters), rtol=1e-6, atol=0)
    assert get_adapter_class("lora").regularization(list(adapters.values())) is None  # other kinds: none


class _Grads(TrainerCallback):
    """Records every trainable gradient when the optimizer phase starts (after the step's backward passes)."""

    def __init__(self):
        self.grads = None

    def phase(self, trainer, name):
        if name != "optimizer":
            return None

        @contextlib.contextmanager
        def grab():
            self.grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            yield

        return grab()


def test_trainer_adds_the_regularization_once_per_step(tmp_path):
    """With grad_accum 2 the step's gradient is ∇(Σ_micro loss_sum / n_target + R), R counted once."""
    from slimtune.train.loop import causal_lm_loss_sum

    t = trainer("kasa_smollm2_udhr", tmp_path, "train.grad_accum=2", "adapter.beta=0.5", "adapter.gamma=0.5",
                quant="none")
    cb = _Grads()
    t.callbacks.append(cb)
    micro = [next(iter(t.data.batches(2, epoch=0, start=i))) for i in range(2)]
    t.model.train()
    t.step(micro)
    n_target = sum(t.objective.count(b) for b in micro)  # the same normalisation as the trainer's
    t.model.zero_grad(set_to_none=True)
    # the reference: the state before the step is gone, so rebuild it from a fresh trainer with the same seed
    ref = trainer("kasa_smollm2_udhr", tmp_path / "ref", "train.grad_accum=2", "adapter.beta=0.5",
                  "adapter.gamma=0.5", quant="none")
    ref.model.train()
    loss = sum(causal_lm_loss_sum(ref.model, b) for b in micro) / n_target
    reg = get_adapter_class("kasa").regularization(list(ref.adapters.values()))
    (loss + reg).backward()
    for n, p in ref.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(cb.grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    sig = next(n for n in cb.grads if n.endswith("kasa_sigma"))
    task_only = sum(causal_lm_loss_sum(ref.model, b) for b in micro) / n_target  # a fresh forward (fused ops
    task_grad = torch.autograd.grad(task_only, ref.model.get_parameter(sig))[0]  # reuse their buffers in backward)
    assert not torch.allclose(cb.grads[sig], task_grad, atol=1e-6)  # R matters


def test_peft_export_is_rank_2r_and_exact(tmp_path):
    from peft import PeftModel

    model = tiny_base("nf4")
    randomize_b(inject(model, cfg()))
    ours = logits(model)
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / PEFT_CONFIG).read_text())["r"] == 8
    peft_model = PeftModel.from_pretrained(tiny_base("nf4"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-4, atol=1e-4)


def test_load_never_recomputes_the_svd(tmp_path, monkeypatch):
    import slimtune.adapters.kasa as kasa

    model = tiny_base()
    randomize_b(inject(model, cfg()))
    ours = logits(model)
    save_native(model, tmp_path)

    def boom(*a, **k):
        raise AssertionError("SVD recomputed on load")

    monkeypatch.setattr(kasa, "smallest_triplets", boom)
    fresh = tiny_base()
    load_native(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), ours, rtol=0, atol=0)


def test_fused_path_equals_unfused():
    def inject_random(model):
        randomize_b(inject(model, cfg()))

    check_fused_equals_unfused(lambda: tiny_base("nf4", layers=2), inject_random)


def test_recipe_trains_on_the_fused_nf4_path(tmp_path):
    check_recipe_trains("kasa_smollm2_udhr", tmp_path, factor=0.985)  # measured: 1571 -> 1537


def test_resume_is_exact(tmp_path):
    check_resume_is_exact("kasa_smollm2_udhr", tmp_path)


def test_counts_and_estimate():
    assert trainable_counts(LLAMA2_7B, "kasa", 16) == closed_form("lora", 16) + 32 * 7 * 16  # + Δσ
    est = estimate_json("kasa_smollm2_udhr")
    assert est["adapter_params"] == 30 * (8 * (2 * 1152 + 2 * 768 + 3 * 2112) + 7 * 8)  # SmolLM2-135M at r 8
    assert est["fused"] and est["unfused"] == []
