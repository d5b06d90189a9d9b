"""The estimator's activation term against what autograd keeps on the fused path, per checkpointing mode (CPU).

How it is measured (slimtune.bench.runner.measure_activation_term): a tiny Llama (3 layers, NF4 base, LoRA r8 on
all seven projections, fused) runs its decoder forward under ``saved_tensors_hooks`` (slimtune.bench.memory,
distinct storages, parameters excluded). Without checkpointing that is every layer's saved set plus the final
norm. With ``full`` checkpointing the hooks see what ``torch.utils.checkpoint`` keeps: each layer's input. With
``offload`` those inputs go through ``save_on_cpu``, whose hooks are innermost; a recording ``save_on_cpu`` counts
what it keeps in host memory. For both checkpointed modes one layer's saved set is added: it exists while that
layer is recomputed in backward (measured by running one decoder layer on its real input), and so are the rotary
cos/sin the checkpointed layers hold for their recompute (once). The estimator's side is
layer inputs + activations (+ the offloaded inputs); its two in-flight copy-back buffers of ``offload`` are GPU
transients, not saved tensors, and are left out (see estimated_activation_term).
"""

from __future__ import annotations

import pytest
import torch

from slimtune.bench.estimate import activation_bytes_per_token_per_layer, estimate
from slimtune.bench.memory import estimated_activation_term, gap_pct, layer_saved_bytes, measure_activation_term
from slimtune.bench.runner import random_tokens

LAYERS, RANK, BATCH, SEQ = 3, 8, 2, 32


def _fused_model(dtype: torch.dtype, mode: str, layers: int = LAYERS):
    import transformers

    from slimtune.adapters.inject import inject
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.models.fused import fuse_model
    from slimtune.models.load import quantize_linears
    from slimtune.models.tiny import tiny_llama_config
    from slimtune.train.checkpointing import enable_checkpointing

    cfg = tiny_llama_config(num_hidden_layers=layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    quantize_linears(model, mode="nf4", compute_dtype=dtype)
    inject(model, LoRAConfig(rank=RANK, alpha=2 * RANK))
    report = fuse_model(model)
    assert report.fully_fused, report.lines()
    enable_checkpointing(model, mode)
    model.train()
    return model, cfg


def _ids(cfg):
    return random_tokens(cfg.vocab_size, BATCH, SEQ, seed=1, device=torch.device("cpu"))


def test_fused_layer_term_is_exact_bf16():
    """Per token per decoder layer, the fused item list equals what one layer saves, byte for byte (bf16; fp32 is
    checked by the recompute term below)."""
    dtype = torch.bfloat16
    model, cfg = _fused_model(dtype, "none", layers=1)
    tokens = BATCH * SEQ
    measured = layer_saved_bytes(model, _ids(cfg)) / tokens
    dt = str(dtype).removeprefix("torch.")
    items = activation_bytes_per_token_per_layer(cfg, fused=True, compute_dtype=dt, rank=RANK)
    assert sum(items.values()) == measured


@pytest.mark.parametrize("mode", ["none", "full", "offload"])
def test_activation_term_within_10_percent(mode):
    model, cfg = _fused_model(torch.float32, mode)
    ids = _ids(cfg)
    tokens, hidden = BATCH * SEQ, cfg.hidden_size
    measured = measure_activation_term(model, ids, mode)
    est = estimate(cfg, quant="nf4", compute_dtype="float32", rank=RANK, seq_len=SEQ, micro_batch=BATCH,
                   grad_checkpointing=mode, fused=True)
    predicted = estimated_activation_term(est)
    gap = gap_pct(predicted["total"], measured["total"])
    print(f"{mode}: estimated {predicted['total']:,} B, measured {measured['total']:,} B, gap {gap:+.1f} %")
    assert abs(gap) <= 10.0, (mode, predicted, measured)

    inputs = LAYERS * tokens * hidden * 4  # every layer's input, fp32
    final_norm = tokens * (hidden * 4 + 4)  # the final norm keeps its output and the inverse RMS
    if mode == "none":
        assert measured["host_saved"] == 0 and measured["recompute_layer"] == 0
    elif mode == "full":  # checkpoint keeps exactly the layer inputs (plus the final norm outside the layers)
        assert measured["device_saved"] == inputs + final_norm and measured["host_saved"] == 0
        assert predicted["layer_inputs"] == inputs
    else:  # offload: the layer inputs are in host memory; only the final norm stays on the device
        assert measured["host_saved"] == inputs == est.cpu_offload_bytes
        assert measured["device_saved"] == final_norm
    if mode != "none":
        per_layer = sum(activation_bytes_per_token_per_layer(cfg, fused=True, compute_dtype="float32",
                                                             rank=RANK).values())
        assert measured["recompute_layer"] == per_layer * tokens
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        # cos and sin (1, T, head_dim) fp32, and the position ids (1, T) int64
        assert measured["shared_inputs"] == 2 * SEQ * head_dim * 4 + SEQ * 8
