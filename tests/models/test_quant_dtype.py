"""Quantized weights declare the compute dtype (issue 23, item 4): the packed codes and absmax are those of the
fp32-declared path, but bitsandbytes dequantizes straight to the compute dtype (no fp32 copy, and its CUDA
``dequantize_4bit(out=)`` writer qualifies), for slimtune's base and for the bench's HF + PEFT baseline alike."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers

from slimtune.adapters.base import dense_weight as layer_dense_weight
from slimtune.adapters.base import set_dense_weight
from slimtune.bench.random_model import random_base
from slimtune.models.load import ModelConfig, QuantConfig, load_model, quantize_linears
from slimtune.models.streaming import quantized_weight
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.ops import gemm_dequant
from slimtune.ops.nf4 import NF4Weight
from slimtune.ops.nf4 import dense_weight as nf4_dense_weight


def _states(model):
    return {n: m.weight.quant_state for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_weight_declares_the_compute_dtype_with_the_same_codes(dtype, double_quant):
    w = torch.randn(96, 128).to(dtype)
    ref = quantized_weight(w.float(), mode="nf4", double_quant=double_quant, blocksize=64, device="cpu")
    new = quantized_weight(w, mode="nf4", double_quant=double_quant, blocksize=64, device="cpu", dtype=dtype)
    assert ref.quant_state.dtype == torch.float32 and new.quant_state.dtype == dtype
    assert torch.equal(ref.data, new.data)  # the packed codes
    assert torch.equal(ref.quant_state.absmax, new.quant_state.absmax)
    if double_quant:
        assert torch.equal(ref.quant_state.state2.absmax, new.quant_state.state2.absmax)
        assert torch.equal(ref.quant_state.offset, new.quant_state.offset)
    # bitsandbytes' own dequantization of the declared dtype: the fp32 values, rounded once
    out = bnbf.dequantize_4bit(new.data, new.quant_state)
    assert out.dtype == dtype
    assert torch.equal(out, bnbf.dequantize_4bit(ref.data, ref.quant_state).to(dtype))


def _spy_dequantize(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = bnbf.dequantize_4bit

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(bnbf, "dequantize_4bit", spy)
    return seen


def test_a_bf16_model_dequantizes_to_bf16_without_an_fp32_copy(monkeypatch):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).to(torch.bfloat16)
    ref = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    quantize_linears(model, mode="nf4", compute_dtype=torch.bfloat16, double_quant=True)
    quantize_linears(ref.float(), mode="nf4", compute_dtype=torch.float32, double_quant=True)
    states, ref_states = _states(model), _states(ref)
    assert states and {qs.dtype for qs in states.values()} == {torch.bfloat16}
    seen = _spy_dequantize(monkeypatch)
    name = "model.layers.0.self_attn.q_proj"  # in_features 64: whole blocks per row, bitsandbytes' native op
    layer, ref_layer = model.get_submodule(name), ref.get_submodule(name)
    assert torch.equal(layer.weight.data, ref_layer.weight.data)
    got = layer_dense_weight(layer, torch.bfloat16)
    assert seen == [torch.bfloat16] and got.dtype == torch.bfloat16  # bitsandbytes wrote bf16 itself
    assert torch.equal(got, layer_dense_weight(ref_layer, torch.float32).to(torch.bfloat16))
    base = NF4Weight.from_params4bit(layer.weight)
    seen.clear()
    assert nf4_dense_weight(base, torch.bfloat16).dtype == torch.bfloat16 and seen == [torch.bfloat16]
    # the dequant backend's writer: bitsandbytes (its CUDA kernel writes into the bf16 buffer on a GPU)
    assert gemm_dequant._writer(base, torch.bfloat16) == "bnb"


def test_a_rewritten_base_weight_keeps_its_declared_dtype():
    """SLoRA moves part of W into its adapter and re-quantizes the rest (``set_dense_weight``)."""
    w = torch.randn(32, 64)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = quantized_weight(w, mode="nf4", double_quant=True, blocksize=64, device="cpu",
                                    dtype=torch.bfloat16)
    set_dense_weight(layer, w * 0.5)
    assert layer.weight.quant_state.dtype == torch.bfloat16
    half = quantized_weight(w * 0.5, mode="nf4", double_quant=True, blocksize=64, device="cpu")
    assert torch.equal(layer.weight.data, half.data)


def test_streamed_and_full_loads_declare_the_compute_dtype(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    q = QuantConfig(mode="nf4", compute_dtype="bfloat16", quantize_lm_head=True)
    for load in ("stream", "full"):
        model = load_model(ModelConfig(name=str(tmp_path), load=load), q, device="cpu").model
        states = _states(model)
        assert "lm_head" in states and {qs.dtype for qs in states.values()} == {torch.bfloat16}, load


def test_the_baseline_base_declares_the_compute_dtype(tmp_path):
    """The bench's HF + PEFT baseline starts from ``random_base``: its 4-bit weights must declare what a real
    ``from_pretrained(quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=bf16), dtype=bf16)`` declares
    (bf16), so that PEFT's backward dequantizes to bf16 as it does for HF users, not to fp32."""
    cfg = tiny_llama_config()
    model = random_base(cfg, device=torch.device("cpu"), dtype=torch.bfloat16)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg, device_map="cpu",
                                                           dtype=torch.bfloat16)
    ours, theirs = _states(model), _states(hf)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, qs in ours.items():
        assert qs.dtype == theirs[name].dtype == torch.bfloat16, name
        assert qs.nested == theirs[name].nested and qs.blocksize == theirs[name].blocksize, name
