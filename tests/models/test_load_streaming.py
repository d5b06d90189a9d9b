"""Streaming load (model.load: stream): the same model as from_pretrained + quantize, at a fraction of the host RAM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from slimtune.errors import ModelError
from slimtune.models.load import ModelConfig, QuantConfig, load_model
from slimtune.models.streaming import quantized_weight
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer


def _save(d, *, tie: bool, shard: str, **shape):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=tie, **shape)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size=shard)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("lm_head", [False, True])
def test_streamed_equals_from_pretrained_then_quantize(tmp_path, tie, lm_head):
    d = _save(tmp_path / "m", tie=tie, shard="60KB", num_hidden_layers=3)
    assert len(list(d.glob("*.safetensors"))) >= 2
    q = QuantConfig(mode="nf4", compute_dtype="float32", quantize_lm_head=lm_head)
    full = load_model(ModelConfig(name=str(d), load="full"), q, device="cpu")
    streamed = load_model(ModelConfig(name=str(d)), q, device="cpu")
    assert streamed.load_path == "stream" and full.load_path.startswith("full")
    a, b = full.model.state_dict(), streamed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # packed NF4 codes, absmax, double-quant state, norms, embeddings: bit for bit
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n1, b1), (n2, b2) in zip(full.model.named_buffers(), streamed.model.named_buffers()):
        assert n1 == n2 and b1.dtype == b2.dtype and torch.equal(b1, b2), n1
    assert type(streamed.model.lm_head) is type(full.model.lm_head)
    if tie and not lm_head:
        assert streamed.model.lm_head.weight is streamed.model.get_input_embeddings().weight
    assert not any(p.requires_grad for p in streamed.model.parameters())
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        assert torch.equal(full.model(input_ids=ids).logits, streamed.model(input_ids=ids).logits)


def test_chunked_quantization_is_bit_identical_to_bitsandbytes(monkeypatch):
    import bitsandbytes as bnb

    import slimtune.models.streaming as streaming

    monkeypatch.setattr(streaming, "QUANT_CHUNK_VALUES", 1000)  # many chunks, rows not a multiple of the chunk
    for shape in [(37, 130), (100, 72), (300, 64)]:
        w = torch.randn(shape)
        for dq in (True, False):
            ref = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=dq).to("cpu")
            new = quantized_weight(w, mode="nf4", double_quant=dq, blocksize=64, device="cpu")
            assert torch.equal(ref.data, new.data)
            assert torch.equal(bnb.functional.dequantize_4bit(ref.data, ref.quant_state),
                               bnb.functional.dequantize_4bit(new.data, new.quant_state))


def test_a_missing_checkpoint_tensor_falls_back_or_refuses(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _save(tmp_path / "m", tie=False, shard="10MB")
    (f,) = d.glob("*.safetensors")
    sd = load_file(f)
    sd["model.extra_thing.weight"] = torch.zeros(3)  # a name the model does not have: transformers would convert
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.load: stream: cannot stream .*match no model tensor"):
        load_model(ModelConfig(name=str(d), load="stream"), QuantConfig(mode="nf4"), device="cpu")
    loaded = load_model(ModelConfig(name=str(d)), QuantConfig(mode="nf4"), device="cpu")  # auto: falls back
    assert loaded.load_path.startswith("full (1 checkpoint tensors match no model tensor")


_PEAK = r"""
import json, sys, torch, transformers
from slimtune.bench.memory import current_rss, _proc_status, _reset_rss_peak, _trim_heap
from slimtune.models.load import ModelConfig, QuantConfig, load_model
torch.set_num_threads(1)
q = QuantConfig(mode="nf4", compute_dtype="bfloat16")
out = {}
# one load of each kind first pays the one-time costs (lazy imports, bitsandbytes' CPU library); then measure
for mode in ("stream", "full", "stream", "full"):
    _trim_heap()
    base = current_rss()
    sampled = not _reset_rss_peak()
    m = load_model(ModelConfig(name=sys.argv[1], load=mode), q, device="cpu").model
    out[mode] = {"extra": (_proc_status("VmHWM") or 0) - base, "sampled": sampled,
                 "nf4": sum(p.untyped_storage().nbytes() for p in m.parameters())}
    del m
print(json.dumps(out))
"""


def test_streamed_load_peaks_near_one_shard_plus_the_quantized_model(tmp_path):
    """Host RSS in a fresh process: the streamed load stays within 1.5 x (NF4 model + largest shard); the old path
    (whole bf16 model first) cannot: it holds every shard at once. Measured here: stream 18.1 MiB, full 54.5 MiB,
    bound 29 MiB (NF4 model 8.0 MiB, shards 8.3 / 11.0 / 11.3 MiB)."""
    d = _save(tmp_path / "m", tie=False, shard="12MB", num_hidden_layers=16, hidden_size=256,
              intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
    shards = list(d.glob("*.safetensors"))
    assert len(shards) == 3
    largest = max(f.stat().st_size for f in shards)
    for attempt in range(3):  # RSS is noisy when other processes run (parallel tests): more fresh processes
        p = subprocess.run([sys.executable, "-c", _PEAK, str(d)], capture_output=True, text=True,
                           env={"OMP_NUM_THREADS": "1", **__import__("os").environ}, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        if res["stream"]["sampled"]:
            pytest.skip("/proc/self/clear_refs is not writable here: no per-load peak RSS")
        bound = 1.5 * (res["stream"]["nf4"] + largest)
        if res["stream"]["extra"] <= bound:
            break
    total = sum(f.stat().st_size for f in shards)
    assert res["stream"]["extra"] <= bound, (res, bound)
    assert res["full"]["extra"] > bound, (res, bound)  # the bound does discriminate: the old path exceeds it
    assert res["full"]["extra"] > 0.9 * total  # it holds the whole bf16 model at once


def _write_tiny_gguf(path, model, cfg):
    """A float32 GGUF of ``model`` with llama.cpp's tensor names and its q/k row permutation."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)

    def permute(t, heads):  # what llama.cpp's converter does to q and k (transformers undoes it on load)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:]).removesuffix(".weight")
            if rest == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
            gname = f"blk.{i}.{per_layer[rest]}.weight"
        else:
            gname = names[name]
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_streamed_equals_from_pretrained_then_quantize(tmp_path):
    from slimtune.models.load import prepare_loaded
    from slimtune.models.streaming import stream_gguf

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=96)
    ref_model = transformers.LlamaForCausalLM(cfg)
    _write_tiny_gguf(tmp_path / "tiny.gguf", ref_model, cfg)
    q = QuantConfig(mode="nf4", compute_dtype="float32")
    full = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    full = prepare_loaded(full, None, q, device=torch.device("cpu"), source="tiny.gguf").model
    streamed, why = stream_gguf(tmp_path / "tiny.gguf", ModelConfig(name=str(tmp_path / "tiny.gguf")), q,
                                device=torch.device("cpu"), dtype=torch.float32)
    assert why is None
    a, b = full.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        out = streamed(input_ids=ids).logits
        assert torch.equal(full(input_ids=ids).logits, out)
        # and the un-permuted q/k are right: the same logits as the source model quantized in place
        ref = prepare_loaded(ref_model, None, q, device=torch.device("cpu"), source="ref").model(input_ids=ids).logits
    assert torch.equal(ref, out)
