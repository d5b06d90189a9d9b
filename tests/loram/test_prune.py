"""LoRAM pruning: identity at ratio 0, closed-form counts, GQA grouping, equivalence with zeroed channels,
save/load round trip, streaming checkpoint pruning, and the 70B parameter-reduction figure (meta device)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from slimtune.errors import SlimtuneError
from slimtune.models.arch import all_specs
from slimtune.models.tiny import tiny_config
from slimtune.loram.prune import (
    KeptIndex,
    load_pruned,
    parameter_reduction,
    prune_checkpoint,
    prune_model,
    save_pruned,
)

TINY = dict(hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
            vocab_size=300)


def make(kind: str = "llama", seed: int = 0, **over) -> transformers.PreTrainedModel:
    cfg = {**TINY, **over}
    config = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM)(config).eval()
    with torch.no_grad():  # random biases so that bias pruning is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def ids(n: int = 11, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def zero_pruned_channels(model, kept: KeptIndex) -> None:
    """Zero, in the ORIGINAL model, every row/column the map prunes (weights and biases), by the family's table."""
    spec = kept.spec
    with torch.no_grad():
        for i in kept.layers:
            layer = spec.decoder_layers(model)[i]
            for p in spec.projections:
                _zero(spec.module(layer, spec.block_of(p.name)), kept.channels(i, p.name), 0 if p.prune == "out" else 1)


def _zero(lin, keep: torch.Tensor, dim: int) -> None:
    mask = torch.ones(lin.weight.shape[dim], dtype=torch.bool)
    mask[keep] = False
    if dim == 0:
        lin.weight[mask] = 0
        if lin.bias is not None:
            lin.bias[mask] = 0
    else:
        lin.weight[:, mask] = 0


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ratio_zero_is_identity(kind):
    model = make(kind)
    x = ids()
    ref = model(x).logits
    pruned, kept = prune_model(model, ratio=0.0, keep_first=1, keep_last=1)
    assert sorted(kept.layers) == [1, 2]
    assert all(lk.kv_heads == [0, 1] and lk.neurons == list(range(136)) for lk in kept.layers.values())
    torch.testing.assert_close(pruned(x).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kind,over,method",
    [
        ("llama", {}, "magnitude"),
        ("llama", dict(attention_bias=True, mlp_bias=True, num_attention_heads=8, num_key_value_heads=4), "random"),
        ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2), "magnitude"),
        ("llama", dict(tie_word_embeddings=True), "random"),
    ],
)
def test_param_count_matches_closed_form_and_zeroed_original(kind, over, method):
    model = make(kind, **over)
    config, n_orig = model.config, n_params(model)
    zeroed = make(kind, **over)
    x = ids()
    pruned, kept = prune_model(model, ratio=0.6, method=method, keep_first=1, keep_last=1, seed=3)
    red = parameter_reduction(config, kept, quant_bits=4)
    assert red["original_params"] == n_orig
    assert red["pruned_params"] == n_params(pruned)
    assert red["pruned_params"] < red["original_params"]
    # ⌊0.6·n⌋ removed, at least one kept
    n_kv, n_i = config.num_key_value_heads, config.intermediate_size
    for lk in kept.layers.values():
        assert len(lk.kv_heads) == max(1, n_kv - int(0.6 * n_kv)) and len(lk.neurons) == n_i - int(0.6 * n_i)
    # the pruned model computes exactly what the original computes with the pruned channels zeroed
    zero_pruned_channels(zeroed, kept)
    torch.testing.assert_close(pruned(x).logits, zeroed(x).logits, rtol=1e-5, atol=1e-5)


def test_gqa_groups_and_magnitude_choice():
    model = make("llama", num_attention_heads=8, num_key_value_heads=4)  # G = 2, head_dim = 8
    d, g = 8, 2
    with torch.no_grad():  # make KV group 2 (kv head 2, query heads 4, 5) and neurons 7, 99 dominant in layer 1
        att, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        att.k_proj.weight[2 * d:3 * d] *= 20
        att.q_proj.weight[4 * d:6 * d] *= 20
        mlp.down_proj.weight[:, [7, 99]] *= 50
        orig = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, kept = prune_model(model, ratio=0.75, keep_first=1, keep_last=2)
    assert sorted(kept.layers) == [1]
    lk = kept.layers[1]
    assert lk.kv_heads == [2] and kept.q_heads(1) == [4, 5]
    assert {7, 99} <= set(lk.neurons) and len(lk.neurons) == 136 - 102
    att = pruned.model.layers[1].self_attn
    pre = "model.layers.1.self_attn."
    torch.testing.assert_close(att.q_proj.weight, orig[pre + "q_proj.weight"][4 * d:6 * d], rtol=0, atol=0)
    torch.testing.assert_close(att.k_proj.weight, orig[pre + "k_proj.weight"][2 * d:3 * d], rtol=0, atol=0)
    torch.testing.assert_close(att.v_proj.weight, orig[pre + "v_proj.weight"][2 * d:3 * d], rtol=0, atol=0)
    torch.testing.assert_close(att.o_proj.weight, orig[pre + "o_proj.weight"][:, 4 * d:6 * d], rtol=0, atol=0)
    torch.testing.assert_close(
        pruned.model.layers[1].mlp.down_proj.weight, orig["model.layers.1.mlp.down_proj.weight"][:, lk.neurons]
    )
    # random selection respects the grouping too: kept q heads are exactly the heads of the kept kv heads
    _, kept_r = prune_model(make("llama", num_attention_heads=8, num_key_value_heads=4), ratio=0.5, method="random",
                            seed=7)
    for i, lkr in kept_r.layers.items():
        assert len(lkr.kv_heads) == 2
        assert kept_r.q_heads(i) == [h * g + j for h in lkr.kv_heads for j in range(g)]
        q = kept_r.channels(i, "q_proj").view(-1, d)
        assert torch.equal(q // d // g, torch.tensor(lkr.kv_heads).repeat_interleave(g)[:, None].expand(-1, d))
    # untouched layers stay untouched
    for i in (0, 2, 3):
        for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(pruned.state_dict()[f"model.layers.{i}.{k}"], orig[f"model.layers.{i}.{k}"])


def test_random_is_seeded():
    a = prune_model(make(), ratio=0.5, method="random", seed=5)[1]
    b = prune_model(make(seed=9), ratio=0.5, method="random", seed=5)[1]
    c = prune_model(make(), ratio=0.5, method="random", seed=6)[1]
    assert a.layers == b.layers and a.layers != c.layers


def test_forward_backward_generate():
    pruned, kept = prune_model(make("qwen2"), ratio=0.5, keep_first=1, keep_last=1)
    x = ids(9, batch=1)
    out = pruned(x, labels=x)
    out.loss.backward()
    g = pruned.model.layers[1].mlp.down_proj.weight.grad
    assert g is not None and g.shape == (64, 68) and torch.isfinite(g).all()
    gen = pruned.generate(x, max_new_tokens=4, do_sample=False)
    # greedy decoding with the KV cache equals recomputing the whole prefix each step
    seq = x
    with torch.no_grad():
        for _ in range(4):
            nxt = pruned(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_load_round_trip(tmp_path, kind):
    pruned, kept = prune_model(make(kind, tie_word_embeddings=(kind == "qwen2")), ratio=0.5, keep_first=1, keep_last=1)
    x = ids()
    ref = pruned(x).logits
    save_pruned(pruned, kept, tmp_path / "p")
    assert KeptIndex.load(tmp_path / "p") == kept
    saved = json.loads((tmp_path / "p" / "loram.json").read_text())
    assert saved["layers"]["1"]["q_heads"] == kept.q_heads(1)
    loaded = load_pruned(tmp_path / "p", attn_implementation="eager")
    sd = pruned.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(loaded(x).logits, ref, rtol=0, atol=0)
    assert n_params(loaded) == n_params(pruned)
    bf = load_pruned(tmp_path / "p", dtype=torch.bfloat16)
    assert bf.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(bf(x).logits.float()).all()


def test_prune_checkpoint_streams_to_same_model(tmp_path):
    model = make("qwen2")
    model.save_pretrained(tmp_path / "orig")
    kept_s = prune_checkpoint(tmp_path / "orig", tmp_path / "p", ratio=0.5, keep_first=1, keep_last=1)
    pruned, kept = prune_model(model, ratio=0.5, keep_first=1, keep_last=1)
    assert kept_s.layers == kept.layers
    assert (tmp_path / "p" / "model-layer-00002.safetensors").is_file()
    x = ids()
    loaded = load_pruned(tmp_path / "p", attn_implementation="eager")
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(SlimtuneError, match="ratio"):
        prune_model(make(), ratio=1.0)
    with pytest.raises(SlimtuneError, match="method"):
        prune_model(make(), ratio=0.5, method="taylor")
    with pytest.raises(SlimtuneError, match="exceeds"):
        prune_model(make(), ratio=0.5, keep_first=3, keep_last=2)


def test_70b_parameter_reduction_on_meta_device():
    """LLaMA-3.1-70B at ratio 0.85 keeping 4 first / 2 last layers: the LoRAM paper's 15.81× (QLoRAM)."""
    config = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    pruned, kept = prune_model(model, ratio=0.85, method="random", keep_first=4, keep_last=2)
    assert all(p.device.type == "meta" for p in pruned.parameters())
    assert len(kept.layers) == 74
    assert all(len(lk.kv_heads) == 2 and len(lk.neurons) == 4301 for lk in kept.layers.values())
    red = parameter_reduction(config, kept, quant_bits=4)
    assert red["original_params"] == 70_553_706_496
    assert red["pruned_params"] == n_params(pruned) == 17_851_801_600
    assert round(red["paper_reduction"], 2) == 15.81
    assert round(red["param_reduction"], 2) == 3.95
    assert round(red["memory_reduction"], 1) == 11.4  # NF4 0.516 B/param linears, bf16 embeddings + lm_head
    # LLaMA-2-70B has the same layers and a 32k vocabulary: the paper's 16.95×
    llama2 = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)
    assert round(parameter_reduction(llama2, kept, quant_bits=4)["paper_reduction"], 2) == 16.95


PRUNABLE = sorted({s.name for s in all_specs().values() if s.loram_prunable(tiny_config(s.name)) is None})


@pytest.mark.parametrize("model_type", PRUNABLE)
def test_every_prunable_family_prunes_exactly(model_type):
    """Each family's spec drives pruning: the pruned model equals the original with the pruned channels zeroed
    (Gemma's (1 + w) norms and q/k norms, Qwen3's q/k norms and Qwen2's biases included), counts are closed-form."""
    cfg = tiny_config(model_type, vocab_size=TINY["vocab_size"], num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    zeroed = copy.deepcopy(model)
    pruned, kept = prune_model(model, ratio=0.5, keep_first=1, seed=2)
    assert sorted(kept.layers) == [1, 2] and kept.spec.name == model_type
    assert parameter_reduction(cfg, kept)["pruned_params"] == n_params(pruned)
    zero_pruned_channels(zeroed, kept)
    x = ids()
    torch.testing.assert_close(pruned(x).logits, zeroed(x).logits, rtol=1e-5, atol=1e-5)


def test_family_that_cannot_be_pruned_is_refused():
    from slimtune.errors import ModelError

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("phi3", vocab_size=300))
    with pytest.raises(ModelError, match="phi3: its attention splits qkv_proj"):
        prune_model(model, ratio=0.5)
