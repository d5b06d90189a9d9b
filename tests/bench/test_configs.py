"""Built-in model configs, config resolution (folder / json / GGUF / hub cache / table) and exact parameter counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimtune.bench.configs import (
    BUILTIN_CONFIGS,
    builtin_config_dict,
    known_model_names,
    parameter_counts,
    resolve_model_config,
)
from slimtune.errors import ModelError, SlimtuneError
from slimtune.models.arch import spec_for


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # allocates nothing, even for 70B
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_parameter_counts_exact_against_meta_model(name):
    cfg = resolve_model_config(name)
    model = _meta_model(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once

    spec = spec_for(cfg)
    named = dict(model.named_parameters())
    assert counts["embed_tokens"] == named[f"{spec.embed}.weight"].numel()
    lm_head = 0 if cfg.tie_word_embeddings else named["lm_head.weight"].numel()
    assert counts["lm_head"] == lm_head
    assert counts["final_norm"] == named[f"{spec.final_norm}.weight"].numel()
    layer = spec.decoder_layers(model)[0]
    modules = dict(layer.named_modules())
    for proj in spec.proj_names:
        owner = modules[spec.block_of(proj)]
        assert counts["per_layer"][proj] == sum(p.numel() for p in owner.parameters()), proj
    assert counts["per_layer_total"] == sum(p.numel() for p in layer.parameters())
    assert counts["linear_weights"] == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("_proj.weight")
    )


def test_published_sizes():
    # Totals as published on the model cards / by the config arithmetic everyone quotes.
    assert parameter_counts(resolve_model_config("meta-llama/Llama-3.1-8B"))["total"] == 8_030_261_248
    assert parameter_counts(resolve_model_config("Qwen/Qwen2.5-0.5B"))["total"] == 494_032_768
    assert parameter_counts(resolve_model_config("Qwen/Qwen2.5-7B-Instruct"))["total"] == 7_615_616_512
    assert parameter_counts(resolve_model_config("HuggingFaceTB/SmolLM2-135M"))["total"] == 134_515_008
    assert parameter_counts(resolve_model_config("Qwen/Qwen3-8B"))["total"] == 8_190_735_360
    assert parameter_counts(resolve_model_config("google/gemma-2-2b"))["total"] == 2_614_341_888
    assert parameter_counts(resolve_model_config("microsoft/Phi-3-mini-4k-instruct"))["total"] == 3_821_079_552


def test_builtin_values():
    llama = resolve_model_config("meta-llama/Llama-3.1-8B")
    assert type(llama).__name__ == "LlamaConfig"
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (4096, 14336, 32)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size) == (32, 8, 128256)
    assert llama.tie_word_embeddings is False and llama.max_position_embeddings == 131072
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    qwen = resolve_model_config("qwen2.5-3b-instruct")
    assert type(qwen).__name__ == "Qwen2Config" and qwen.tie_word_embeddings is True
    assert qwen.eos_token_id == 151645 and qwen.rope_parameters["rope_theta"] == 1000000.0
    counts = parameter_counts(qwen)
    assert counts["per_layer"]["q_proj"] == 2048 * 2048 + 2048  # Qwen2 q/k/v carry a bias
    assert counts["per_layer"]["o_proj"] == 2048 * 2048
    assert counts["lm_head"] == 0
    smol = resolve_model_config("SmolLM2-135M-Instruct")
    assert smol.model_type == "llama" and smol.head_dim == 64 and smol.num_key_value_heads == 3


def test_name_matching_ignores_org_and_case():
    assert builtin_config_dict("META-LLAMA/llama-3.1-70b")["num_hidden_layers"] == 80
    assert builtin_config_dict("someone-else/Qwen2.5-7B")["vocab_size"] == 152064
    assert builtin_config_dict("meta-llama/Meta-Llama-3.1-8B")["hidden_size"] == 4096
    assert builtin_config_dict("Llama-2-7b")["vocab_size"] == 32000
    assert builtin_config_dict("gpt2") is None
    assert "Llama-3.1-8B" in known_model_names()


def test_unknown_model_is_one_line_error_naming_id_and_known_names():
    with pytest.raises(ModelError) as info:
        resolve_model_config("acme/NotAModel-1B")
    msg = str(info.value)
    assert "acme/NotAModel-1B" in msg and "Llama-3.1-8B" in msg and "\n" not in msg
    assert isinstance(info.value, SlimtuneError) and info.value.exit_code == 2


def test_local_folder_and_json(tmp_path):
    values = {**builtin_config_dict("SmolLM2-135M"), "num_hidden_layers": 3}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    from_folder = resolve_model_config(folder)
    from_file = resolve_model_config(str(folder / "config.json"))
    assert from_folder.num_hidden_layers == from_file.num_hidden_layers == 3
    assert from_folder.vocab_size == 49152

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_config(empty)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="bad.json"):
        resolve_model_config(bad)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="expected a model folder"):
        resolve_model_config(tmp_path / "weights.bin")


def _write_gguf(path, *, arch="qwen2", tied=True, extra=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_block_count(3)
    w.add_context_length(4096)
    w.add_embedding_length(128)
    w.add_feed_forward_length(352)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(300)
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)
    w.add_tensor("token_embd.weight", np.zeros((300, 128), dtype=np.float16))
    if not tied:
        w.add_tensor("output.weight", np.zeros((300, 128), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    cfg = resolve_model_config(path)
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 352, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 300)
    assert cfg.max_position_embeddings == 4096 and cfg.rms_norm_eps == pytest.approx(1e-6)
    assert cfg.tie_word_embeddings is True and cfg.bos_token_id == 7
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in _meta_model(cfg).parameters())

    folder = tmp_path / "folder"
    folder.mkdir()
    _write_gguf(folder / "m.gguf", arch="llama", tied=False)
    cfg2 = resolve_model_config(folder)  # a folder with one .gguf and no config.json
    assert cfg2.model_type == "llama" and cfg2.tie_word_embeddings is False

    # every family's llama.cpp name maps back (ArchSpec.gguf_arch), with Gemma's extras
    gemma = tmp_path / "gemma.gguf"
    _write_gguf(gemma, arch="gemma2", extra={"attention.sliding_window": 64, "attn_logit_softcapping": 50.0,
                                               "final_logit_softcapping": 30.0})
    cfg3 = resolve_model_config(gemma)
    assert cfg3.model_type == "gemma2" and cfg3.sliding_window == 64
    assert (cfg3.attn_logit_softcapping, cfg3.final_logit_softcapping) == (50.0, 30.0)
    _write_gguf(tmp_path / "phi.gguf", arch="phi3")
    assert resolve_model_config(tmp_path / "phi.gguf").model_type == "phi3"

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        resolve_model_config(junk)


def test_hub_cache_is_used_before_the_table(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--Qwen--Qwen2.5-0.5B"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    values = {**builtin_config_dict("Qwen2.5-0.5B"), "num_hidden_layers": 5}  # differs from the table
    (snap / "config.json").write_text(json.dumps(values))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_config("Qwen/Qwen2.5-0.5B").num_hidden_layers == 5
    # not cached under that org: the table answers
    assert resolve_model_config("other/Qwen2.5-0.5B").num_hidden_layers == 24
