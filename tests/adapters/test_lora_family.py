"""LoRA / rsLoRA / DoRA: forward equals the formula, merge equals unmerged, PEFT loads the export identically."""

import math

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.adapters.base import LayerRange, dense_weight, get_adapter_class
from slimtune.adapters.export import export_peft, load_native, save_native
from slimtune.adapters.inject import adapters_of, find_targets, inject, merge
from slimtune.models.load import QuantConfig, prepare_loaded


def tiny_llama(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_model(quant="none", seed=0, layers=3):
    m = tiny_llama(seed, layers)
    return prepare_loaded(m, None, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny").model


def randomize(adapters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            for n, p in a.named_parameters():
                if not n.startswith("base_layer."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in n else 0.0))


def cfg(kind, **kw):
    return get_adapter_class(kind).Config(kind=kind, rank=kw.pop("rank", 4), alpha=kw.pop("alpha", 8.0), **kw)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_forward_matches_formula(kind, quant):
    model = make_model(quant)
    adapters = inject(model, cfg(kind))
    randomize(adapters)
    a = adapters["model.layers.1.self_attn.q_proj"]
    x = torch.randn(5, 64)
    w = dense_weight(a.base_layer)  # (out, in)
    s = 8.0 / 4 if kind != "rslora" else 8.0 / math.sqrt(4)
    ba = a.lora_B @ a.lora_A
    if kind == "dora":
        n = (w + s * ba).norm(dim=1)
        ratio = a.lora_magnitude / n
        want = x @ w.t() + (ratio - 1) * (x @ w.t()) + ratio * (s * x @ ba.t())
    else:
        want = x @ w.t() + s * x @ ba.t()
    torch.testing.assert_close(a(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merge_equals_unmerged(kind, quant):
    model = make_model(quant)
    randomize(inject(model, cfg(kind)))
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
        merge(model)
        after = model(ids).logits
    assert not adapters_of(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_init_is_identity_and_only_adapters_train():
    model = make_model()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    inject(model, cfg("dora"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) for n in names)
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_targets_and_layer_selection():
    model = make_model(layers=5)
    c = cfg("lora", targets=["q_proj", "down_proj"], layers=LayerRange(first=1, last=2))
    names = find_targets(model, c)
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj",
        "model.layers.4.self_attn.q_proj", "model.layers.4.mlp.down_proj",
    ]
    assert len(find_targets(model, cfg("lora"))) == 5 * 7  # all-linear, lm_head excluded
    with pytest.raises(ValueError, match="matched no linear"):
        inject(model, cfg("lora", targets=["qproj"]))


@pytest.mark.parametrize(
    "kind,layers", [("lora", None), ("rslora", None), ("dora", None), ("lora", LayerRange(first=1, last=1))]
)
def test_peft_loads_export_with_same_logits(kind, layers, tmp_path):
    from peft import PeftModel

    model = make_model(layers=3)
    randomize(inject(model, cfg(kind, layers=layers)))
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        ours = model(ids).logits
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(layers=3), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_native_round_trip(kind, tmp_path):
    model = make_model("nf4")
    randomize(inject(model, cfg(kind)))
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    save_native(model, tmp_path / "a")
    fresh = make_model("nf4")
    load_native(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref)


def test_linear_base_layer_kinds():
    lin = nn.Linear(200, 136)
    from slimtune.adapters.lora import LoRA

    a = LoRA(lin, cfg("lora", rank=7))
    assert a.lora_A.shape == (7, 200) and a.lora_B.shape == (136, 7)
    assert a.trainable_parameter_count() == 7 * (200 + 136)
