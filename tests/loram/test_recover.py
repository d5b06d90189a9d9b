"""LoRAM recovery: the recovered adapter's ΔW equals the trained ΔW on kept channels and is zero on pruned ones, and
PEFT on the original model with the pruned channels zeroed reproduces the pruned model + adapter exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from slimtune.errors import SlimtuneError
from slimtune.loram.prune import prune_model, save_pruned
from slimtune.loram.recover import recover_adapter
from test_prune import ids, make, zero_pruned_channels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRE = "base_model.model.model.layers"


def train_on_pruned(tmp_path, kind="llama", *, over=None, lora=None, ratio=0.5):
    """Prune a tiny model, put a (non-trivially initialised) LoRA on it and save both."""
    over = over or {}
    pruned, kept = prune_model(make(kind, **over), ratio=ratio, keep_first=1, keep_last=1)
    save_pruned(pruned, kept, tmp_path / "pruned")
    torch.manual_seed(11)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0) | (lora or {})
    peft = get_peft_model(pruned, LoraConfig(**cfg)).eval()
    peft.save_pretrained(tmp_path / "adapter")
    return peft, kept


def delta(sd, layer, block, proj, scale):
    key = f"{PRE}.{layer}.{block}.{proj}"
    return scale * sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]


@pytest.mark.parametrize("kind,over", [("llama", {}), ("qwen2", dict(num_attention_heads=8, num_key_value_heads=4))])
def test_recovered_delta_matches_on_kept_and_is_zero_on_pruned(tmp_path, kind, over):
    _, kept = train_on_pruned(tmp_path, kind, over=over)
    out = recover_adapter(tmp_path / "adapter", tmp_path / "pruned", tmp_path / "recovered")
    small = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    big = load_file(out / "adapter_model.safetensors")
    assert small.keys() == big.keys()
    geo = kept.geometry
    full = {"q_proj": (geo.num_heads * geo.head_dim, geo.hidden_size),
            "k_proj": (geo.num_kv_heads * geo.head_dim, geo.hidden_size),
            "v_proj": (geo.num_kv_heads * geo.head_dim, geo.hidden_size),
            "o_proj": (geo.hidden_size, geo.num_heads * geo.head_dim),
            "gate_proj": (geo.intermediate_size, geo.hidden_size),
            "up_proj": (geo.intermediate_size, geo.hidden_size),
            "down_proj": (geo.hidden_size, geo.intermediate_size)}
    for layer in range(geo.num_layers):
        for p in kept.spec.projections:  # the projection table of the family (its ArchSpec)
            proj, dim, block = p.name, p.prune, kept.spec.block_of(p.name).rsplit(".", 1)[0]
            d_small, d_big = delta(small, layer, block, proj, 2.0), delta(big, layer, block, proj, 2.0)
            assert d_big.shape == full[proj]
            if layer not in kept.layers:
                assert torch.equal(d_big, d_small)
                continue
            idx = kept.channels(layer, proj)
            kept_part = d_big[idx] if dim == "out" else d_big[:, idx]
            torch.testing.assert_close(kept_part, d_small, rtol=1e-6, atol=1e-7)
            mask = torch.ones(d_big.shape[0 if dim == "out" else 1], dtype=torch.bool)
            mask[idx] = False
            assert mask.any()
            rest = d_big[mask] if dim == "out" else d_big[:, mask]
            assert torch.count_nonzero(rest) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(TARGETS)


@pytest.mark.parametrize(
    "kind,over,lora",
    [("llama", {}, {}), ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2), dict(lora_bias=True))],
)
def test_recovered_adapter_on_zeroed_original_reproduces_pruned_outputs(tmp_path, kind, over, lora):
    peft_small, kept = train_on_pruned(tmp_path, kind, over=over, lora=lora)
    x = ids()
    with torch.no_grad():
        want = peft_small(x).logits
    out = recover_adapter(tmp_path / "adapter", kept, tmp_path / "recovered", base_model_name_or_path="org/original")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/original"

    original = make(kind, **over)  # same seed → the same weights the pruned model was cut from
    zero_pruned_channels(original, kept)
    big = PeftModel.from_pretrained(original, out).eval()
    with torch.no_grad():
        got = big(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the recovered adapter is a real adapter on the untouched original (the LoRAM inference setting)
    full = PeftModel.from_pretrained(make(kind, **over), out).eval()
    with torch.no_grad():
        assert torch.isfinite(full(x).logits).all()


def test_dora_on_pruned_layers_is_refused_but_allowed_on_intact_ones(tmp_path):
    train_on_pruned(tmp_path, lora=dict(use_dora=True))
    with pytest.raises(SlimtuneError, match="DoRA"):
        recover_adapter(tmp_path / "adapter", tmp_path / "pruned", tmp_path / "recovered")

    # DoRA restricted to the intact first/last layers (layers_to_transform) copies through unchanged and stays exact
    (tmp_path / "b").mkdir()
    train_on_pruned(tmp_path / "b", lora=dict(use_dora=True, layers_to_transform=[0, 3]))
    out = recover_adapter(tmp_path / "b" / "adapter", tmp_path / "b" / "pruned", tmp_path / "b" / "recovered")
    small = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    big = load_file(out / "adapter_model.safetensors")
    assert small.keys() == big.keys() and all(torch.equal(small[k], big[k]) for k in small)


def test_mismatched_map_and_full_tensors_are_refused(tmp_path):
    train_on_pruned(tmp_path, ratio=0.5)
    (tmp_path / "other").mkdir()
    _, other = prune_model(make(), ratio=0.25, keep_first=1, keep_last=1)
    with pytest.raises(SlimtuneError, match="not trained on this pruned model"):
        recover_adapter(tmp_path / "adapter", other, tmp_path / "recovered")

    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    sd[f"{PRE}.1.self_attn.q_proj.bias"] = torch.zeros(32)  # what PEFT bias="all" would save
    save_file(sd, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SlimtuneError, match="full tensor of a pruned projection"):
        recover_adapter(tmp_path / "adapter", tmp_path / "pruned", tmp_path / "recovered")
