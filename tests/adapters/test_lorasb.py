"""LoRA-SB: the gradient the fused NF4 ops catch equals the full gradient of the dequantized weight, the init is the
rank-r SVD of −η·sign(G) (float64), module groups do not change it, only R trains (forward and gradient against the
formula), the shipped recipe's init lowers the loss and training lowers it further, exact resume, counts, estimate,
PEFT export."""

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.counts import trainable_counts
from slimtune.adapters.export import export_peft
from slimtune.adapters.inject import inject
from slimtune.adapters.lorasb import LoRASB
from slimtune.models.fused import causal_lm_loss, fuse_model

from adapter_helpers import tiny_base
from kind_training import batch_loss, check_resume_is_exact, estimate_json, logits, trainer
from test_counts import LLAMA2_7B

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"  # (128, 64): in < out
DOWN = "model.layers.0.mlp.down_proj"  # (64, 136): out < in
BATCHES = [torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def cfg(**kw):
    kw = {"rank": 4, "alpha": 8.0, **kw}
    return get_adapter_class("lora_sb").Config(kind="lora_sb", **kw)


def loss_fn(model, ids):
    return causal_lm_loss(model, input_ids=ids, labels=ids, reduction="sum")


def dense_gradients(quant):
    """∇W of Σ_batches loss for every projection of the tiny model, W = the (dequantized) weights as dense fp32."""
    model = tiny_base("none")
    src = tiny_base(quant)
    weights = {n: dense_weight(m) for n, m in src.named_modules() if n.endswith("_proj")}
    with torch.no_grad():
        for n, m in model.named_modules():
            if n in weights:
                m.weight.copy_(weights[n])
                m.weight.requires_grad_(True)
    for ids in BATCHES:
        loss_fn(model, ids).backward()
    return {n: m.weight.grad.double() for n, m in model.named_modules() if n in weights}


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_fused_ops_catch_the_full_gradient(quant):
    want = dense_gradients(quant)
    model = tiny_base(quant)
    adapters = inject(model, cfg())
    assert fuse_model(model).fully_fused
    for a in adapters.values():
        a._probe = torch.zeros(a.out_features, a.in_features, requires_grad=True)
    for ids in BATCHES:
        loss_fn(model, ids).backward()
    for n in (Q, K, DOWN):
        got = adapters[n]._probe.grad.double()
        torch.testing.assert_close(got, want[n], rtol=1e-4, atol=1e-6 * float(want[n].abs().max()))


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_init_is_the_rank_r_svd_of_the_first_adam_step(quant, monkeypatch):
    want = dense_gradients(quant)
    model = tiny_base(quant)
    adapters = inject(model, cfg())
    fuse_model(model)
    seen = {}
    set_from_update = LoRASB.set_from_update

    def record(self, update):
        seen[self.name] = update.clone()
        set_from_update(self, update)

    monkeypatch.setattr(LoRASB, "set_from_update", record)
    LoRASB.init_from_data(list(adapters.values()), model, iter(BATCHES), loss_fn, lr=0.01)
    for n in (Q, K, DOWN):
        g = want[n]
        sure = g.abs() > 1e-4 * g.abs().max()  # entries whose sign fp32 summation order cannot flip
        assert torch.equal(torch.sign(seen[n]).double()[sure], -torch.sign(g)[sure])
        assert set(seen[n].abs().unique().tolist()) <= {0.0, float(torch.tensor(0.01))}  # −η·sign(G), η = lr
        a = adapters[n]
        u, s, vh = torch.linalg.svd(seen[n].double(), full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # Eckart–Young: the best rank-4 approximation
        torch.testing.assert_close(a.delta_weight().double(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.lora_B.t().double() @ a.lora_B.double(), torch.eye(4, dtype=torch.float64),
                                   rtol=0, atol=1e-5)  # orthonormal columns (frozen)
        assert bool(a.lorasb_from_data) and a.trainable_names() == ["lorasb_R"] and a._probe is None
        assert not a.lora_A.requires_grad and not a.lora_B.requires_grad


def test_groups_do_not_change_the_init():
    results = []
    for mib in (1, 1024):  # 1 MiB: every module in its own pass; 1024: one pass for all
        model = tiny_base()
        adapters = inject(model, cfg(estimate_mib=mib))
        LoRASB.init_from_data(list(adapters.values()), model, iter(BATCHES), loss_fn, lr=0.01)
        results.append({n: a.delta_weight() for n, a in adapters.items()})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=0, atol=1e-6)


def test_forward_and_r_gradient_match_float64_formula():
    model = tiny_base("nf4")
    adapters = inject(model, cfg())
    LoRASB.init_from_data(list(adapters.values()), model, iter(BATCHES), loss_fn, lr=0.01)
    a = adapters[DOWN]
    x = torch.randn(5, a.in_features, requires_grad=True)
    g = torch.randn(5, a.out_features)
    (a(x) * g).sum().backward()
    R = a.lorasb_R.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = x64 @ dense_weight(a.base_layer).double().t() + 2.0 * x64 @ (a.lora_B.double() @ R @ a.lora_A.double()).t()
    (y * g.double()).sum().backward()
    torch.testing.assert_close(a(x).detach().double(), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lorasb_R.grad.double(), R.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert a.lora_A.grad is None and a.lora_B.grad is None


def test_recipe_init_lowers_the_loss_and_training_lowers_it_further(tmp_path):
    t = trainer("lora_sb_smollm2_udhr", tmp_path)
    assert t.fuse_report.fully_fused and all(bool(a.lorasb_from_data) for a in t.adapters.values())
    batch = next(iter(t.data.batches(4, epoch=0)))
    t.model.eval()
    init = batch_loss(t, batch)
    saved = {n: a.lorasb_R.detach().clone() for n, a in t.adapters.items()}
    with torch.no_grad():
        for a in t.adapters.values():
            a.lorasb_R.zero_()  # R = 0: the base model
    base = batch_loss(t, batch)
    with torch.no_grad():
        for n, a in t.adapters.items():
            a.lorasb_R.copy_(saved[n])
    t.train()
    t.model.eval()
    after = batch_loss(t, batch)
    assert init < base and after < 0.99 * init  # measured: 1572 (base) -> 1566 (init) -> 1544 (8 steps)
    ours = logits(t.model, batch["input_ids"])
    export_peft(t.model, tmp_path / "peft")  # plain rank-r LoRA: A, s·B R
    from peft import PeftModel

    from kind_training import tiny_loaded

    peft_model = PeftModel.from_pretrained(tiny_loaded().model, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, batch["input_ids"]), ours, rtol=1e-4, atol=1e-4)


def test_resume_is_exact(tmp_path):
    check_resume_is_exact("lora_sb_smollm2_udhr", tmp_path)


def test_counts_and_estimate():
    assert trainable_counts(LLAMA2_7B, "lora_sb", 16) == 32 * 7 * 16 * 16  # R only
    est = estimate_json("lora_sb_smollm2_udhr")
    assert est["adapter_params"] == 30 * 7 * 64  # SmolLM2-135M at r 8: 8 x 8 per module
    assert est["fused"] and est["unfused"] == []
