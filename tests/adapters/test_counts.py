"""Trainable-parameter counts on a Llama-2-7B config built on the meta device equal the closed forms."""

import pytest
from transformers import LlamaConfig

from slimtune.adapters.base import LayerRange, registry
from slimtune.adapters.counts import trainable_counts

LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000,
)
H, I, L = 4096, 11008, 32
SHAPES = [(H, H)] * 4 + [(H, I), (H, I), (I, H)]  # (in, out) of q, k, v, o, gate, up, down


def closed_form(kind, r, shapes=SHAPES, layers=L, at_end=False):
    per_layer = {
        "lora": sum(r * (i + o) for i, o in shapes),
        "rslora": sum(r * (i + o) for i, o in shapes),
        "dora": sum(r * (i + o) + o for i, o in shapes),
        "lamda": sum(r * r + (0 if at_end else o * r) for i, o in shapes),  # S (+ B until it is frozen)
        "lamda_pp": sum(r * r + (0 if at_end else o * r) for i, o in shapes),  # meta: the budget split evenly
        "slora": sum(r * (i + o) + r * r for i, o in shapes),
        "nlora": sum(r * (i + o) + r * r for i, o in shapes),
        "inttune": sum(r * r for i, o in shapes),
    }[kind]
    return layers * per_layer


def test_published_anchors():
    assert trainable_counts(LLAMA2_7B, "lora", 16) == 39_976_960
    assert trainable_counts(LLAMA2_7B, "inttune", 128) == 3_670_016


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "lamda", "lamda_pp", "slora", "nlora", "inttune"])
def test_closed_forms(kind):
    assert trainable_counts(LLAMA2_7B, kind, 16) == closed_form(kind, 16)
    if kind == "lamda":
        assert trainable_counts(LLAMA2_7B, kind, 16, at_end=True) == closed_form(kind, 16, at_end=True)


def test_every_registered_kind_counts_on_meta():
    for kind in registry():
        assert trainable_counts(LLAMA2_7B, kind, 8, targets=["q_proj"], layers=[0]) > 0


def test_layers_targets_and_modules_to_save():
    layra = trainable_counts(LLAMA2_7B, "lora", 8, layers=LayerRange(first=10, last=2))
    assert layra == closed_form("lora", 8, layers=12)
    assert trainable_counts(LLAMA2_7B, "lora", 8, layers={"first": 10, "last": 2}) == layra
    qv = trainable_counts(LLAMA2_7B, "lora", 8, targets=["q_proj", "v_proj"])
    assert qv == closed_form("lora", 8, shapes=SHAPES[:2])
    embed = trainable_counts(LLAMA2_7B, "lora", 8, targets=["q_proj"], modules_to_save=["embed_tokens"])
    assert embed == closed_form("lora", 8, shapes=SHAPES[:1]) + 32000 * H
