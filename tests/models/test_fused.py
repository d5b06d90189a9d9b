"""fuse_model on tiny Llama / Qwen2: same loss and adapter gradients as the plain (PEFT-style) model."""

import copy

import pytest
import torch
import torch.nn as nn
import transformers

from slimtune.adapters.inject import inject
from slimtune.models.fused import FusedAttention, FusedMLP, FusedRMSNorm, causal_lm_loss, fuse_model
from slimtune.ops.dispatch import use_backend

SHAPE = dict(hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=300)


def _model(arch: str, *, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE))  # q/k/v carry biases
    for name, p in model.named_parameters():  # non-trivial norms and biases
        if name.endswith("norm.weight"):
            nn.init.uniform_(p, 0.5, 1.5)
        elif name.endswith("bias"):
            nn.init.normal_(p, std=0.1)
    return model.to(dtype).train()


def _adapt(model: nn.Module, kind: str = "lora", **cfg) -> None:
    from slimtune.adapters.base import get_adapter_class

    config = get_adapter_class(kind).Config(rank=cfg.pop("rank", 4), alpha=8.0, **cfg)
    adapters = inject(model, config)
    g = torch.Generator().manual_seed(1)
    for a in adapters.values():  # B = 0 at init would hide errors in dA
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)


def _batch(T: int = 37, B: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPE["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, : T // 3] = -100  # a masked prompt
    return ids, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compare(plain, fused, ids, labels, backend, tol):
    ref = plain(input_ids=ids, labels=labels).loss
    ref.backward()
    with use_backend(backend):
        loss = causal_lm_loss(fused, input_ids=ids, labels=labels)
        loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < tol
    g0, g1 = _grads(plain), _grads(fused)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.isfinite(g1[n]).all(), n
        assert _rel(g1[n], g0[n]) < tol, (n, _rel(g1[n], g0[n]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_equals_plain_torch_backend(arch, kind):
    plain = _model(arch)
    _adapt(plain, kind)
    fused = copy.deepcopy(plain)
    report = fuse_model(fused)
    assert report.fully_fused, report.unfused
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(fused.model.norm, FusedRMSNorm)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # same names: exports unchanged
    _compare(plain, fused, *_batch(), "torch", 2e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_equals_plain_triton_interpreter(arch):
    plain = _model(arch, seed=3)
    _adapt(plain, "lora", rank=3)
    fused = copy.deepcopy(plain)
    assert fuse_model(fused).fully_fused
    _compare(plain, fused, *_batch(T=9, B=1), "triton", 1e-4)


def test_fused_nf4_base_nf4_head_and_trainable_norm():
    from slimtune.models.load import quantize_linears

    plain = _model("llama", seed=4)
    quantize_linears(plain, mode="nf4", compute_dtype=torch.float32, double_quant=True, include_lm_head=True)
    _adapt(plain, "lora")
    plain.model.layers[1].post_attention_layernorm.weight.requires_grad_(True)  # a trained norm: grads must match
    fused = copy.deepcopy(plain)
    report = fuse_model(fused)
    assert report.fully_fused, report.unfused
    _compare(plain, fused, *_batch(T=21), "torch", 2e-5)


def test_logits_and_greedy_generation_unchanged():
    plain = _model("qwen2", seed=5)
    _adapt(plain, "lora")
    plain.eval()
    fused = copy.deepcopy(plain)
    fuse_model(fused)
    ids, _ = _batch(T=11, B=1)
    with torch.no_grad():
        assert _rel(fused(input_ids=ids).logits, plain(input_ids=ids).logits) < 1e-5
        a = plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = fused.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # kv cache path
    assert torch.equal(a, b)


def test_unfusable_modules_are_reported_and_still_correct():
    plain = _model("llama", seed=6)
    _adapt(plain, "lora", dropout=0.1, targets=["gate_proj", "up_proj", "down_proj"])  # dropout only on the MLP
    plain.eval()  # dropout off, so the outputs can be compared; the dropout config still blocks fusion
    fused = copy.deepcopy(plain)
    lines = []
    report = fuse_model(fused, log=lines.append)
    why = dict(report.unfused)
    assert why["model.layers.0.mlp"] == "gate_proj: adapter dropout 0.1 > 0"
    assert not isinstance(fused.model.layers[0].mlp, FusedMLP)
    assert "model.layers.0.self_attn.qkv: lora_qkv" in report.fused  # frozen plain q/k/v: fused, no LoRA term
    assert lines == report.lines() and any("dropout 0.1" in line for line in lines)
    ids, labels = _batch(T=13)
    _compare(plain, fused, ids, labels, "torch", 2e-5)


def test_foreign_adapter_and_unknown_architecture():
    class ForeignLoRA(nn.Module):  # e.g. PEFT's own layer: not read through .factors()
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = nn.Linear(base.in_features, 2, bias=False)

        def forward(self, x):
            return self.base_layer(x)

    model = _model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    attn = model.model.layers[1].self_attn
    attn.o_proj = ForeignLoRA(attn.o_proj)
    report = fuse_model(model)
    assert dict(report.unfused)["model.layers.1.self_attn.o_proj"] == "unsupported adapter ForeignLoRA"
    assert "model.layers.0.self_attn.o_proj: lora_linear" in report.fused
    assert fuse_model(model).fused == report.fused  # idempotent

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    before = [type(m) for m in gpt2.modules()]
    r = fuse_model(gpt2)
    assert not r.fused and "unknown architecture 'gpt2'" in r.unfused[0][1]
    assert [type(m) for m in gpt2.modules()] == before


def test_causal_lm_loss_sum_reduction_counts_targets():
    model = _model("llama")
    ids, labels = _batch(T=10)
    n_targets = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = causal_lm_loss(model, input_ids=ids, labels=labels)
        total = causal_lm_loss(model, input_ids=ids, labels=labels, reduction="sum")
        norm = causal_lm_loss(model, input_ids=ids, labels=labels, reduction="sum", normalizer=n_targets)
        hf = model(input_ids=ids, labels=labels).loss
    assert abs(mean.item() - hf.item()) < 1e-5
    assert abs(total.item() / n_targets - hf.item()) < 1e-5 and abs(norm.item() - hf.item()) < 1e-5
