"""LayRA: adapters only on the selected layers (every kind); model arithmetic θ_base + Δ + λ(θ_instruct − θ_base)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimtune.adapters.arithmetic import apply_task_vector, arithmetic_merge
from slimtune.adapters.base import LayerRange, get_adapter_class, registry
from slimtune.adapters.export import export_peft, save_native
from slimtune.adapters.inject import adapters_of, inject, layer_index, merge

IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny(seed=0, layers=5):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def cfg(kind, **kw):
    return get_adapter_class(kind).Config(kind=kind, rank=kw.pop("rank", 8), alpha=16.0, **kw)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------- LayRA


@pytest.mark.parametrize("kind", sorted(registry()))
def test_layra_selects_layers_for_every_kind(kind):
    model = tiny()
    adapters = inject(model, cfg(kind, layers=LayerRange(first=2, last=1), targets=["q_proj", "down_proj"]))
    assert sorted({layer_index(n) for n in adapters}) == [0, 1, 4]
    assert len(adapters) == 6
    trainable_layers = {layer_index(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_layers == {0, 1, 4}
    explicit = inject(tiny(), cfg(kind, layers=[3, 1], targets=["q_proj"]))
    assert sorted(explicit) == ["model.layers.1.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]


def test_layra_peft_export_transforms_only_those_layers(tmp_path):
    from peft import PeftModel

    model = tiny()
    adapters = inject(model, cfg("lamda", layers={"first": 1, "last": 1}))
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.1)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["layers_to_transform"] == [0, 4]
    peft_model = PeftModel.from_pretrained(tiny(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- arithmetic


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    tiny(0, layers=2).save_pretrained(root / "base")
    tiny(1, layers=2).save_pretrained(root / "instruct")
    (root / "instruct" / "tokenizer_config.json").write_text("{}")  # stands for the instruct tokenizer files
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    adapters = inject(model, cfg("lora", layers=LayerRange(first=1, last=0), modules_to_save=["lm_head"]))
    save_native(model, root / "zero")  # B = 0: a zero adapter (lm_head unchanged)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
        model.lm_head.weight.add_(0.01)
    save_native(model, root / "trained")
    export_peft(model, root / "trained_peft")
    return root, logits(model)


def state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_lambda_zero_is_base_plus_adapter(folders, tmp_path):
    root, adapted_logits = folders
    for adapter in ("trained", "trained_peft"):
        out = arithmetic_merge(root / "base", root / adapter, root / "instruct", 0.0, tmp_path / adapter)
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert not adapters_of(merged)
        torch.testing.assert_close(logits(merged), adapted_logits, rtol=1e-5, atol=1e-5)
        assert json.loads((out / "slimtune_arithmetic.json").read_text())["lam"] == 0.0
        assert (out / "tokenizer_config.json").is_file()  # copied from the instruct folder


def test_lambda_one_zero_adapter_is_the_instruct_model(folders, tmp_path):
    root, _ = folders
    out = arithmetic_merge(root / "base", root / "zero", root / "instruct", 1.0, tmp_path / "out")
    got, want = state(out), state(root / "instruct")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bit for bit


def test_task_vector_formula(folders):
    root, _ = folders
    base, instruct = state(root / "base"), state(root / "instruct")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    from slimtune.adapters.export import load_native

    load_native(model, root / "trained")
    merge(model)
    adapted = {k: v.clone() for k, v in model.state_dict().items()}
    apply_task_vector(model, root / "base", tiny(1, layers=2), 0.3)  # a folder and a model as sources
    for name, p in model.named_parameters():
        want = base[name] + (adapted[name] - base[name]) + 0.3 * (instruct[name] - base[name])
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-6)
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(adapted[q1], model.get_parameter(q1))


def test_task_vector_refuses_unmerged_or_mismatched(folders):
    root, _ = folders
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    inject(model, cfg("lora"))
    with pytest.raises(ValueError, match="merge them first"):
        apply_task_vector(model, root / "base", root / "instruct", 0.5)
    with pytest.raises(KeyError, match="no tensor named"):
        apply_task_vector(tiny(0, layers=3), root / "base", root / "instruct", 0.5)
