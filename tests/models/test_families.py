"""Every registered family on the fused path: loss and every adapter gradient equal HF + PEFT on the same weights.

Per family (tiny config from its ArchSpec: 2 layers, hidden 64, fp32): a random model with non-trivial norms and
biases gets slimtune LoRA adapters on every linear module (B random, so dA is tested), which are exported in PEFT's
format and loaded by ``PeftModel.from_pretrained`` onto a copy of the same base (so the export is what PEFT expects:
Phi-3's targets are its packed qkv_proj / gate_up_proj). The fused copy's ``causal_lm_loss`` and gradients must
equal PEFT's ``forward(labels=...)`` loss and gradients, and its ``FuseReport`` must list no unfused module.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.export import export_peft
from slimtune.adapters.inject import adapters_of, inject
from slimtune.models.arch import all_specs, spec_for
from slimtune.models.fused import FusedAttention, FusedMLP, FusedRMSNorm, causal_lm_loss, fuse_model
from slimtune.models.tiny import tiny_config
from slimtune.ops.dispatch import use_backend

FAMILIES = sorted({s.name for s in all_specs().values()})
VOCAB = 300


def family_model(model_type: str, *, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``model_type`` (fp32, eager-free unless the family needs eager) with non-trivial
    norm weights and biases."""
    from transformers import AutoModelForCausalLM

    spec = spec_for(model_type)
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, vocab_size=VOCAB, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # around 1 for w-norms, around 0 for (1 + w)-norms
            nn.init.uniform_(p, 0.5 - spec.norm_offset, 1.5 - spec.norm_offset)
        elif name.endswith("bias"):
            nn.init.normal_(p, std=0.1)
    return model.float().train()


def adapt(model: nn.Module, kind: str = "lora", rank: int = 4) -> None:
    inject(model, get_adapter_class(kind).Config(rank=rank, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    for a in adapters_of(model).values():  # B = 0 at init would hide errors in dA
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)


def batch(T: int = 37, B: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[0, : T // 3] = -100  # a masked prompt
    return ids, labels


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _peft_reference(base: nn.Module, adapted: nn.Module, tmp_path):
    from peft import PeftModel

    out = export_peft(adapted, tmp_path / "peft")
    model = PeftModel.from_pretrained(base, out, is_trainable=True)
    model.train()
    return model, json.loads((out / "adapter_config.json").read_text())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_fused_equals_hf_peft(model_type, tmp_path):
    spec = spec_for(model_type)
    base = family_model(model_type)
    ours = copy.deepcopy(base)
    adapt(ours)
    peft_model, peft_cfg = _peft_reference(copy.deepcopy(base), ours, tmp_path)
    assert sorted(peft_cfg["target_modules"]) == sorted(spec.proj_names)  # Phi-3: qkv_proj, gate_up_proj, ...

    report = fuse_model(ours)
    assert report.unfused == [], report.lines()
    layer = spec.decoder_layers(ours)[0]
    assert isinstance(getattr(layer, spec.attn), FusedAttention) and isinstance(getattr(layer, spec.mlp), FusedMLP)
    assert all(isinstance(getattr(layer, n), FusedRMSNorm) for n, _ in spec.layer_norms)

    ids, labels = batch()
    ref = peft_model(input_ids=ids, labels=labels).loss
    ref.backward()
    with use_backend("torch"):
        loss = causal_lm_loss(ours, input_ids=ids, labels=labels)
        loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-6, (loss.item(), ref.item())

    peft_params = dict(peft_model.named_parameters())
    n = 0
    for name, a in adapters_of(ours).items():
        for ours_name, peft_name in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight")):
            p = peft_params[f"base_model.model.{name}.{peft_name}"]
            mine = getattr(a, ours_name)
            assert torch.equal(p.detach(), mine.detach())  # the export is 1:1 for LoRA
            assert _rel(mine.grad, p.grad) < 2e-5, (name, ours_name, _rel(mine.grad, p.grad))
            n += 1
    assert n == 2 * len(spec.projections) * spec.geometry(ours.config).layers


@pytest.mark.parametrize("model_type", ["gemma2", "phi3"])  # (1 + w) norms, GeGLU, softcaps; packed projections
def test_family_fused_triton_interpreter(model_type):
    """The same equality through the Triton kernels (interpreter on CPU), against the HF model with our adapters."""
    plain = family_model(model_type, seed=3)
    adapt(plain, rank=3)
    fused = copy.deepcopy(plain)
    assert fuse_model(fused).unfused == []
    ids, labels = batch(T=9, B=1)
    ref = plain(input_ids=ids, labels=labels).loss
    ref.backward()
    with use_backend("triton"):
        loss = causal_lm_loss(fused, input_ids=ids, labels=labels)
        loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, grads[n]) < 1e-4, n


def test_gemma_softcap_changes_the_loss_and_is_kept():
    """Softcapping is not a no-op on the tiny Gemma 2 (so the equality above really tests it)."""
    capped = family_model("gemma2", attn_logit_softcapping=0.5, final_logit_softcapping=0.5)
    plain = copy.deepcopy(capped)
    plain.config.final_logit_softcapping = None
    for layer in plain.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    ids, labels = batch(T=12, B=1)
    with torch.no_grad():
        a, b = capped(input_ids=ids, labels=labels).loss, plain(input_ids=ids, labels=labels).loss
        fuse_model(capped)
        c = causal_lm_loss(capped, input_ids=ids, labels=labels)
    assert abs(a - b) > 1e-3 and abs(c - a) < 1e-5


def test_unfusable_family_is_reported_and_trains_unfused():
    """A Phi config with a partial rotary factor: the spec says why, nothing is swapped, the loss is still right."""
    model = family_model("phi3", partial_rotary_factor=0.5)
    before = [type(m) for m in model.modules()]
    report = fuse_model(model)
    assert report.unfused and "partial_rotary_factor 0.5" in report.unfused[0][1] and not report.fused
    assert [type(m) for m in model.modules()] == before
    ids, labels = batch(T=9, B=1)
    with torch.no_grad():
        fused_loss = causal_lm_loss(model, input_ids=ids, labels=labels)
        assert abs(fused_loss - model(input_ids=ids, labels=labels).loss) < 1e-5


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_fused_generation_unchanged(model_type):
    """Inference through the fused modules (KV cache, sliding layers, q/k norms) matches HF's, token for token."""
    plain = family_model(model_type, seed=5)
    adapt(plain)
    plain.eval()
    fused = copy.deepcopy(plain)
    assert fuse_model(fused).unfused == []
    ids, _ = batch(T=11, B=1)
    with torch.no_grad():
        assert _rel(fused(input_ids=ids).logits, plain(input_ids=ids).logits) < 1e-5
        a = plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = fused.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_spec_facts_match_the_hf_modules(model_type):
    """What the spec states and the fused path does not compute itself is what HF's modules do: the embedding
    scale (Gemma: sqrt(hidden), applied inside HF's embedding) and the bias rule."""
    spec = spec_for(model_type)
    model = family_model(model_type)
    ids, _ = batch(T=5, B=1)
    emb = spec.module(model, spec.embed)
    with torch.no_grad():
        want = torch.nn.functional.embedding(ids, emb.weight) * spec.embed_scale(model.config)
        torch.testing.assert_close(emb(ids), want)
    layer = spec.decoder_layers(model)[0]
    assert {p: spec.module(layer, spec.block_of(p)).bias is not None for p in spec.proj_names} == spec.bias_map(
        model.config)
