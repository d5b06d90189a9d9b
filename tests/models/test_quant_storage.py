"""quant.quant_storage: the packed 4-bit bytes viewed as another dtype (FSDP all-gathers one dtype per layer) give
the very same weights, through bitsandbytes' own forward and through the fused ops' NF4 reader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimtune.models.load import QuantConfig, quant_storage_dtype, quantize_linears, set_quant_storage
from slimtune.models.tiny import tiny_llama_config
from slimtune.ops.nf4 import as_nf4_weight, dense_weight


def quantized_tiny():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).float()
    quantize_linears(model, mode="nf4", compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_view_keeps_every_weight_and_output(dtype):
    ref, model = quantized_tiny(), quantized_tiny()
    n = set_quant_storage(model, dtype)
    assert n == 14  # 2 layers x 7 projections; lm_head stays dense
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    q = model.model.layers[1].mlp.down_proj
    assert q.weight.dtype == dtype and q.quant_storage == dtype
    w = dense_weight(as_nf4_weight(q), torch.float32)
    assert torch.equal(w, dense_weight(as_nf4_weight(ref.model.layers[1].mlp.down_proj), torch.float32))
    assert set_quant_storage(model, dtype) == 0  # already so: nothing to do


def test_auto_is_the_compute_dtype_only_when_sharded():
    auto, fixed = QuantConfig(), QuantConfig(quant_storage="bfloat16")
    assert quant_storage_dtype(auto, torch.bfloat16, sharded=False) == torch.uint8
    assert quant_storage_dtype(auto, torch.bfloat16, sharded=True) == torch.bfloat16
    assert quant_storage_dtype(QuantConfig(mode="none"), torch.bfloat16, sharded=True) == torch.uint8
    assert quant_storage_dtype(fixed, torch.float32, sharded=False) == torch.bfloat16
