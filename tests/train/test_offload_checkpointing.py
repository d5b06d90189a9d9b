"""Memory features of training: offloaded checkpointing gives the gradients of no / full checkpointing (plain and
fused path), the 8-bit and paged 8-bit AdamW run on CPU, and a run reports its peak memory."""

from __future__ import annotations

import pytest
import torch

from slimtune.train.checkpointing import enable_checkpointing

MODES = ("none", "full", "offload")


def _model(fused: bool, mode: str):
    import transformers

    from slimtune.adapters.inject import inject
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.models.tiny import tiny_llama_config

    cfg = tiny_llama_config(num_hidden_layers=3)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    adapters = inject(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():  # B = 0 at init would make every gradient of A zero: give B values
        for a in adapters.values():
            a.lora_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(a.name)))
    if fused:
        from slimtune.models.fused import fuse_model

        assert fuse_model(model).fully_fused
    enable_checkpointing(model, mode)
    model.train()
    return model


def _loss_and_grads(fused: bool, mode: str):
    from slimtune.train.loop import causal_lm_loss_sum

    model = _model(fused, mode)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = causal_lm_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return float(loss.detach()), grads


@pytest.mark.parametrize("fused", [False, True], ids=["hf", "fused"])
def test_offload_gives_the_same_gradients(fused):
    results = {mode: _loss_and_grads(fused, mode) for mode in MODES}
    loss0, grads0 = results["none"]
    assert any(g.abs().max() > 0 for n, g in grads0.items() if "lora_A" in n)
    for mode in ("full", "offload"):
        loss, grads = results[mode]
        assert loss == pytest.approx(loss0, rel=1e-6, abs=1e-6), mode
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_offload_keeps_the_layer_inputs_on_the_host():
    from slimtune.bench.memory import recording_offload

    model = _model(True, "offload")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with recording_offload() as host:
        out = model.model(input_ids=ids).last_hidden_state
    assert host["tensors"] == 3 and host["bytes"] == 3 * 2 * 24 * 64 * 4  # 3 layer inputs (B, T, hidden) fp32
    out.sum().backward()


def test_checkpointing_needs_a_supporting_model():
    with pytest.raises(ValueError, match="does not support"):
        enable_checkpointing(torch.nn.Linear(2, 2), "full")
    assert enable_checkpointing(torch.nn.Linear(2, 2), "none") == 0


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_step_on_cpu(name):
    """bitsandbytes 0.50: both run on CPU; the paged one falls back to ordinary (unpaged) 8-bit state there."""
    pytest.importorskip("bitsandbytes")
    from slimtune.config.recipe import TrainConfig
    from slimtune.train.optim import build_optimizer

    big = torch.nn.Parameter(torch.randn(64, 128))  # >= 4,096 values: 8-bit state
    small = torch.nn.Parameter(torch.randn(16))  # under bitsandbytes' threshold: 32-bit state
    opt = build_optimizer([big, small], TrainConfig(optimizer=name, lr=1e-2))
    before = big.detach().clone(), small.detach().clone()
    ((big ** 2).sum() + small.sum()).backward()
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU") if name.startswith("paged") \
            else _nothing():
        opt.step()
    assert not torch.equal(big, before[0]) and not torch.equal(small, before[1])
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[small]["state1"].dtype == torch.float32


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_run_summary_reports_peak_memory(tmp_path):
    """A fused run with offloaded checkpointing and paged 8-bit AdamW trains on CPU and reports its peak memory."""
    from transformers import LlamaForCausalLM

    from slimtune.config.recipe import load_recipe_dict
    from slimtune.models.load import QuantConfig, prepare_loaded
    from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
    from slimtune.train.loop import Trainer

    recipe = load_recipe_dict({
        "name": "t", "model": {"name": "tiny-llama"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 2}], "format": "text", "max_seq_len": 32},
        "train": {"steps": 2, "micro_batch": 2, "warmup": 0, "grad_checkpointing": "offload", "fused": True,
                  "optimizer": "paged_adamw8bit", "device": "cpu"},
        "output": {"dir": str(tmp_path / "run")},
    })
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    loaded = prepare_loaded(LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))), tok, QuantConfig(mode="nf4"),
                            device=torch.device("cpu"), source="tiny")
    seen = []

    class Reporter:
        def log(self, m): pass
        def warn(self, m): pass
        def start(self, **kw): pass
        def stop(self): pass
        def step(self, result, peak): seen.append(peak)

    trainer = Trainer(recipe, run_dir=tmp_path / "run", loaded=loaded, reporter=Reporter())
    trainer.setup()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = trainer.train()
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(h.loss)) for h in trainer.history)
    assert len(seen) == 2 and all(p > 0 for p in seen)
    assert summary["peak_memory_bytes"] >= max(seen) > 0
