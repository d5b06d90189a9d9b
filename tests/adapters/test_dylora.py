"""DyLoRA: the truncated forward and its gradients against a float64 transcription, the rank draws, eval/export at any
rank b ≤ r (PEFT loads `slimtune export --rank b`), the fused path, training from the shipped recipe, exact resume,
counts and the estimate."""

import math
from collections import Counter

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.counts import trainable_counts
from slimtune.adapters.dylora import sampled_rank
from slimtune.adapters.export import export_peft, save_native
from slimtune.adapters.inject import inject, merge

from adapter_helpers import tiny_base
from kind_training import (check_fused_equals_unfused, check_recipe_trains, check_resume_is_exact,
                           estimate_json, logits, randomize_b)
from test_counts import LLAMA2_7B, closed_form

Q = "model.layers.0.self_attn.q_proj"


def cfg(**kw):
    kw = {"rank": 6, "alpha": 12.0, **kw}
    return get_adapter_class("dylora").Config(kind="dylora", **kw)


def test_rank_draws_are_uniform_and_a_function_of_the_step():
    draws = [sampled_rank(0, t, 8) for t in range(8000)]
    counts = Counter(draws)
    assert set(counts) == set(range(1, 9))
    assert max(counts.values()) - min(counts.values()) < 0.1 * 1000  # ~1000 each
    assert draws[:50] == [sampled_rank(0, t, 8) for t in range(50)]
    assert draws[:50] != [sampled_rank(1, t, 8) for t in range(50)]


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_training_step_matches_float64_formula(frozen, quant):
    """y = W x + (alpha/b)·B[:, :b] A[:b] x at the drawn b; frozen: only row b of A and column b of B get a gradient.
    The scale is the public code's (alpha/r)·√(r/b)·√(r/b) = alpha/b."""
    model = tiny_base(quant)
    a = inject(model, cfg(frozen=frozen))[Q]
    randomize_b({Q: a})
    a.train()
    for step in (0, 3, 7):
        a.on_step(step, 10)
        b = a.train_rank
        assert b == sampled_rank(0, step, 6)
        a.zero_grad()
        x = torch.randn(5, 64, requires_grad=True)
        g = torch.randn(5, a.out_features)
        (a(x) * g).sum().backward()
        A, B = a.lora_A.detach().double().requires_grad_(), a.lora_B.detach().double().requires_grad_()
        x64 = x.detach().double()
        scale = (12.0 / 6) * math.sqrt(6 / b) ** 2
        y = x64 @ dense_weight(a.base_layer).double().t() + scale * x64 @ A[:b].t() @ B[:, :b].t()
        (y * g.double()).sum().backward()
        torch.testing.assert_close(a(x).detach().double(), y.detach(), rtol=1e-5, atol=1e-5)
        want_a, want_b = A.grad.clone(), B.grad.clone()
        if frozen:  # the public code detaches rows < b - 1 (0-based): only direction b learns
            want_a[: b - 1] = 0
            want_b[:, : b - 1] = 0
        torch.testing.assert_close(a.lora_A.grad.double(), want_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad.double(), want_b, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(a.lora_A.grad[b:]) == 0 and torch.count_nonzero(a.lora_B.grad[:, b:]) == 0


def test_eval_merge_and_peft_export_at_any_rank(tmp_path):
    from peft import PeftModel

    model = tiny_base("nf4")
    adapters = inject(model, cfg())
    randomize_b(adapters)
    full = logits(model)
    for b in (2, 6):
        for a in adapters.values():
            a.select_rank(b)
        ours = logits(model)
        assert (b == 6) == torch.equal(ours, full)
        export_peft(model, tmp_path / f"r{b}")
        peft_model = PeftModel.from_pretrained(tiny_base("nf4"), str(tmp_path / f"r{b}")).eval()
        assert peft_model.peft_config["default"].r == b
        torch.testing.assert_close(logits(peft_model), ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="ranks 1..6"):
        adapters[Q].select_rank(7)
    merged = merge(model)  # at the selected rank (2)
    torch.testing.assert_close(logits(merged), ours, rtol=1e-4, atol=1e-4)


def test_export_cli_rank(tmp_path):
    """`slimtune export ADAPTER --rank b --model BASE` writes the rank-b LoRA; PEFT loads it with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from slimtune.cli import app
    from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    adapters = inject(model, cfg())
    randomize_b(adapters)
    save_native(model, tmp_path / "native")
    for a in adapters.values():
        a.select_rank(3)
    ours = logits(model)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "native"), "--model", str(base_dir), "--rank", "3",
                                   "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    assert peft_model.peft_config["default"].r == 3
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-5, atol=1e-5)
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "native"), "--model", str(base_dir), "--rank", "9",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "ranks 1..6" in bad.output and "Traceback" not in bad.output


def test_fused_path_equals_unfused():
    def inject_random(model):
        randomize_b(inject(model, cfg(rank=5)))

    check_fused_equals_unfused(lambda: tiny_base("nf4", layers=2), inject_random)


def test_recipe_trains_on_the_fused_nf4_path(tmp_path):
    check_recipe_trains("dylora_smollm2_udhr", tmp_path, factor=0.995)  # measured: 1572 -> 1555 (one direction/step)


def test_resume_is_exact(tmp_path):
    check_resume_is_exact("dylora_smollm2_udhr", tmp_path)


def test_counts_and_estimate():
    assert trainable_counts(LLAMA2_7B, "dylora", 16) == closed_form("lora", 16)  # all of A and B (nested ranks)
    est = estimate_json("dylora_smollm2_udhr")
    # SmolLM2-135M at r 8: r·(in + out) of q, o (576→576), k, v (576→192), gate, up, down (576↔1536), 30 layers
    assert est["adapter_params"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert est["fused"] and est["unfused"] == []
