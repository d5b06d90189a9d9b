"""SFT packing: a packed batch has exactly the loss and gradients of its examples run one by one (no attention
across examples, positions restarting), on the plain and the fused model; packed data keeps every target token."""

import json

import pytest
import torch
import transformers

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import inject
from slimtune.config.data import DataConfig
from slimtune.data import build_dataset, collate
from slimtune.data.dataset import pack_examples
from slimtune.models.fused import causal_lm_loss, fuse_model
from slimtune.models.tiny import tiny_tokenizer

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=211)


def _model(arch):
    torch.manual_seed(0)
    cls, cfg = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    model = cls(cfg(**SHAPE)).float().train()
    adapters = inject(model, get_adapter_class("lora").Config(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    for a in adapters.values():  # B = 0 at init would hide errors in dA
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)
    return model


def _pieces(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, SHAPE["vocab_size"], (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a masked prompt
        out.append((ids.numpy(), labels.numpy()))
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_packed_loss_and_grads_equal_the_examples_one_by_one(arch, fused):
    model = _model(arch)
    if fused:
        assert fuse_model(model).fully_fused
    pieces = _pieces([7, 12, 5, 9, 16, 3, 11])
    rows = pack_examples(pieces, max_len=24)
    assert len(rows) < len(pieces) and all(len(r["input_ids"]) <= 24 for r in rows)
    batch = collate(rows, pad_id=0)  # right-padded rows: the padding is a block of its own
    assert "position_ids" in batch
    packed = causal_lm_loss(model, input_ids=batch["input_ids"], labels=batch["labels"],
                            position_ids=batch["position_ids"], reduction="sum")
    packed.backward()
    g_packed = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = torch.zeros(())
    for ids, labels in pieces:
        loss = causal_lm_loss(model, input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None],
                              reduction="sum")
        loss.backward()
        ref += loss.detach()
    g_ref = _grads(model)
    torch.testing.assert_close(packed.detach(), ref, rtol=1e-5, atol=1e-4)
    assert g_packed.keys() == g_ref.keys() and g_ref
    for n in g_ref:
        torch.testing.assert_close(g_packed[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packing_leaks_across_examples_without_the_positions():
    """The property is not vacuous: the same packed rows with ordinary positions (one long sequence) differ."""
    model = _model("llama")
    rows = pack_examples(_pieces([7, 12, 5]), max_len=24)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        a = causal_lm_loss(model, input_ids=batch["input_ids"], labels=batch["labels"],
                           position_ids=batch["position_ids"], reduction="sum")
        b = causal_lm_loss(model, input_ids=batch["input_ids"], labels=batch["labels"], reduction="sum")
    assert (a - b).abs() > 1e-3


def test_packed_sft_data_keeps_every_target(tmp_path):
    rows = [{"instruction": f"Question {i}: " + "word " * (i % 5), "output": f"Answer {i}"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    kw = dict(sources=[{"path": "d.jsonl"}], format="instruction", max_seq_len=128)
    plain = build_dataset(DataConfig(**kw), tok, base_dir=tmp_path, seed=0)
    packed = build_dataset(DataConfig(**kw, packing=True), tok, base_dir=tmp_path, seed=0)
    assert len(packed) < len(plain) // 2
    assert packed.stats["target_tokens"] == plain.stats["target_tokens"]
    assert packed.stats["packed_examples"] == len(plain)
    batch = next(packed.batches(2, epoch=0))
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert int((batch["position_ids"] == 0).sum()) >= 2 * 2  # several examples per row
