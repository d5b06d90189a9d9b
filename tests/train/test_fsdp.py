"""slimtune.train.fsdp pieces that need no process group (the 2-rank runs are in test_distributed.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
from bitsandbytes.nn import Linear4bit, Params4bit
from transformers import AutoModelForCausalLM

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import inject
from slimtune.config.recipe import TrainConfig
from slimtune.models.load import quantize_linears
from slimtune.models.tiny import tiny_qwen2_config
from slimtune.train.fsdp import LocalShards, _place_rest, _quantized, to_cpu
from slimtune.train.optim import build_optimizer


def test_place_rest_moves_every_tensor_once_keeping_ties_and_quant_states():
    """What FSDP leaves on the host (a CUDA run loads there first) goes to the device: tied weights stay one
    Parameter, a Params4bit takes its quant state, the kept module stays. (Here the "device" is meta.)"""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(tie_word_embeddings=True))
    quantize_linears(model, mode="nf4", compute_dtype=torch.float32, include_lm_head=False)
    keep = model.model.norm
    _quantized(model)  # as shard_model does first: each Linear4bit's own quant_state slot
    _place_rest(model, torch.device("meta"), keep=keep)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and isinstance(q.weight, Params4bit) and q.weight.is_meta
    assert q.weight.quant_state.absmax.is_meta and q.quant_state is q.weight.quant_state
    assert not keep.weight.is_meta  # kept where it was
    assert all(p.is_meta for n, p in model.named_parameters() if not n.startswith("model.norm"))
    assert all(b.is_meta for b in model.buffers())


def test_local_shards_steps_like_the_plain_optimizer():
    """Without sharding (plain tensors) LocalShards is the inner optimizer itself: the same updates, the lr the
    schedule sets reaches it, its state dict round-trips."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    plain = build_optimizer(list(a.parameters()), cfg)
    wrapped = LocalShards(list(b.parameters()), lambda local: build_optimizer(local, cfg))
    for step in range(3):
        x = torch.randn(4, 5)
        for m, opt in ((a, plain), (b, wrapped)):
            for g in opt.param_groups:
                g["lr"] = 1e-2 / (step + 1)
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    state = to_cpu(wrapped.state_dict())
    again = LocalShards(list(b.parameters()), lambda local: build_optimizer(local, cfg))
    again.load_state_dict(state)
    assert again.param_groups[0]["lr"] == wrapped.param_groups[0]["lr"] == 1e-2 / 3
    inner = again.inner.state_dict()["state"]
    assert torch.equal(inner[0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])


def test_lora_inject_then_place_rest_leaves_adapters_trainable():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config())
    quantize_linears(model, mode="nf4", compute_dtype=torch.float32)
    inject(model, get_adapter_class("lora").Config(kind="lora", rank=4, alpha=8))
    _place_rest(model, torch.device("meta"), keep=None)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.is_meta and isinstance(p, nn.Parameter) for p in trained)


def test_local_shards_skip_empty_shards():
    """Issue 23: a rank holding no rows of a tensor (a rank-1 adapter's A over 2 ranks) handed its empty shard to
    the inner optimizer, and bitsandbytes' CUDA optimizers fail on the empty launch grid. The empty shard gets no
    gradient (so no optimizer state and no kernel launch), stays in the groups, and the others step as alone."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    empty = nn.Parameter(torch.zeros(0, 8))  # this rank's shard of a (1, 8) lora_A
    full = nn.Parameter(torch.randn(4, 8))
    twin = nn.Parameter(full.detach().clone())
    wrapped = LocalShards([empty, full], lambda local: build_optimizer(local, cfg))
    alone = build_optimizer([twin], cfg)
    for step in range(2):
        g = torch.randn(4, 8)
        empty.grad, full.grad, twin.grad = torch.zeros(0, 8), g.clone(), g.clone()
        wrapped.step()
        alone.step()
    inner_params = [lp for grp in wrapped.inner.param_groups for lp in grp["params"]]
    stepped = [lp for lp in inner_params if lp in wrapped.inner.state]
    assert [tuple(lp.shape) for lp in stepped] == [(4, 8)]  # no state (no launch) for the empty shard
    assert sum(len(grp["params"]) for grp in wrapped.param_groups) == 2  # clipping / zero_grad see both
    assert torch.equal(full, twin)
