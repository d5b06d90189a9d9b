"""GGUF export from a safetensors folder for each supported family (tiny configs), read back by transformers."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from slimtune.errors import SlimtuneError
from slimtune.export.gguf_export import export_gguf
from slimtune.export.lora_gguf import export_lora_gguf
from slimtune.export.source import ModuleDelta, PeftAdapter
from slimtune.models.tiny import tiny_tokenizer

SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=256)
FAMILIES = {
    "llama": (LlamaConfig, {"tie_word_embeddings": False}),
    "mistral": (MistralConfig, {"sliding_window": None, "tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, {"tie_word_embeddings": True}),  # q/k/v biases, tied embeddings, no Q/K permutation
}


def _folder(tmp_path, family):
    tok = tiny_tokenizer()
    cls, extra = FAMILIES[family]
    cfg = cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, **SHAPES, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)  # Qwen2's biases start at zero: make them count
    folder = tmp_path / family
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip_f16(family, tmp_path):
    folder, model, tok = _folder(tmp_path, family)
    q = "model.layers.1.self_attn.q_proj"
    g = torch.Generator().manual_seed(1)
    delta = ModuleDelta(A=torch.randn(4, 64, generator=g) * 0.1, B=torch.randn(64, 4, generator=g) * 0.1, scale=2.0)
    peft = PeftAdapter(config={"r": 4, "lora_alpha": 8}, deltas={q: delta}, saved={})
    # (a neutral file name: transformers reads a llama-arch GGUF whose general.name says "mistral" as its own
    # mistral type, which its GGUF loader then cannot map)
    fname = f"model-{list(FAMILIES).index(family)}.gguf"
    out = export_gguf(str(folder), peft, tmp_path / fname, quant="F16")
    assert out.arch == ("qwen2" if family == "qwen2" else "llama")
    with torch.no_grad():
        lin = model.get_submodule(q)
        lin.weight += delta.scale * delta.B @ delta.A  # the merged reference
        ids = torch.randint(0, len(tok), (1, 12), generator=g)
        want = model(ids).logits
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=fname, dtype=torch.float32).eval()
    with torch.no_grad():
        got = back(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    names = {t.name for t in GGUFReader(str(out.path)).tensors}
    assert ("output.weight" in names) == (family != "qwen2")  # tied: llama.cpp reads token_embd
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    # the adapter alone as a llama.cpp LoRA GGUF for the same base
    lora = export_lora_gguf(str(folder), peft, tmp_path / f"{family}-lora.gguf")
    assert {t.name for t in GGUFReader(str(lora)).tensors} == {"blk.1.attn_q.weight.lora_a", "blk.1.attn_q.weight.lora_b"}


def test_dora_and_saved_modules_refused_for_lora_gguf(tmp_path):
    folder, _, _ = _folder(tmp_path, "llama")
    d = ModuleDelta(A=torch.zeros(4, 64), B=torch.zeros(64, 4), scale=1.0, magnitude=torch.ones(64))
    with pytest.raises(SlimtuneError, match="DoRA"):
        export_lora_gguf(str(folder), PeftAdapter({}, {"model.layers.0.self_attn.q_proj": d}, {}), tmp_path / "x.gguf")
