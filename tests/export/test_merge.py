"""`merge --onto`: the dequantized target reproduces the trained (NF4 base + adapter) model; original does not."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.export import save_native
from slimtune.adapters.inject import inject
from slimtune.errors import SlimtuneError
from slimtune.export.merge import load_merged
from slimtune.models.load import ModelConfig, QuantConfig, load_model
from slimtune.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=len(tok), tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = load_model(ModelConfig(name=str(folder)), QuantConfig(mode="nf4", compute_dtype="float32"), device="cpu")
    kind = get_adapter_class("lora")
    adapters = inject(loaded.model, kind.Config.model_validate({"kind": "lora", "rank": 8, "alpha": 16}))
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.05)
    native = folder / "run" / "adapter_native"
    save_native(loaded.model, native, extra={"base_model": str(folder)})
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded.model.eval()(ids).logits
    return folder, native, ids, logits


@pytest.mark.parametrize("onto, exact", [("dequantized", True), ("original", False)])
def test_merge_targets(trained, onto, exact):
    folder, native, ids, want = trained
    merged = load_merged(ModelConfig(name=str(folder)), native, onto=onto).model.eval()
    assert not any(hasattr(m.weight, "quant_state") for m in merged.modules() if hasattr(m, "weight"))  # all dense
    with torch.no_grad():
        got = merged(ids).logits
    rel = float((got - want).abs().max() / want.abs().max())
    if exact:
        assert rel < 1e-5
    else:  # the NF4 rounding of the base is not in the merged model
        assert rel > 1e-3


def test_unknown_target_is_one_line_error(trained):
    folder, native, _, _ = trained
    with pytest.raises(SlimtuneError, match="--onto nf4: choose one of original, dequantized"):
        load_merged(ModelConfig(name=str(folder)), native, onto="nf4")
