"""NLoRA / IntTune train at LoRA-like learning rates (issue 18 item 4).

Nyström factors C = W[:, :r], N = pinv(W[:r, :r]), R = W[:r, :] have norms that multiply every Adam step: on
SmolLM2-135M r8, ‖C U⁺‖ and ‖U⁺ R‖ are 90-740 against LoRA's ‖A₀‖ = 1.6, and the loss went 2.9 → 12-21 after one
step at lr 1e-4. ``balance`` (default) rescales the three factors so each moves W like LoRA's A does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtune.config.recipe import Recipe
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train.loop import Trainer, causal_lm_loss_sum


def tiny_model():
    """The tiny Llama with an ill-conditioned leading 8×8 block in every projection, as SmolLM2-135M's are
    (there σ_min(W[:8, :8]) is 0.004-0.05 while ‖W[:, :8]‖ is 2-22, so ‖C U⁺‖ is 95-740)."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p[:8, :8].mul_(0.02)
    return prepare_loaded(model, tok, QuantConfig(mode="none"), device=torch.device("cpu"), source="tiny")


def loss_after(tmp_path: Path, adapter: dict, lr: float, steps: int = 4) -> tuple[float, float]:
    r = Recipe.model_validate({
        "model": {"name": "tiny"}, "quant": {"mode": "none"}, "adapter": {"rank": 8, "alpha": 16, **adapter},
        "data": {"format": "text", "max_seq_len": 32, "sources": [{"path": str(udhr_path("eng")), "max_records": 8}]},
        "train": {"lr": lr, "steps": steps, "micro_batch": 2, "warmup": 0, "schedule": "constant", "seed": 3,
                  "fused": False},
        "output": {"dir": str(tmp_path), "export_peft": False},
    })
    t = Trainer(r, tmp_path, loaded=tiny_model())
    t.setup()
    batch = next(iter(t.data.batches(8, epoch=0)))
    with torch.no_grad():
        before = float(causal_lm_loss_sum(t.model, batch))
    t.train()
    with torch.no_grad():
        return before, float(causal_lm_loss_sum(t.model, batch))


@pytest.mark.parametrize("adapter", [{"kind": "nlora", "residual": "base"}, {"kind": "nlora", "residual": "adapter"},
                                     {"kind": "inttune", "residual": "adapter"}])
def test_balanced_nystrom_trains_at_lr_1e4(tmp_path, adapter):
    before, after = loss_after(tmp_path, adapter, 1e-4)
    assert after < before


def test_balanced_factors_move_w_like_lora():
    """Each factor's tangent gain (‖N A‖, ‖B N‖, ‖B‖‖A‖) equals LoRA's ‖A₀‖ = sqrt(r/3) after balancing, on a weight
    whose leading block is ill-conditioned (unbalanced, the gains are > 50x LoRA's there); the product's direction
    is the Nyström one."""
    from slimtune.adapters.slora import balance_factors, nystrom_factors

    torch.manual_seed(0)
    w = torch.randn(96, 80) * 0.2
    w[:8, :8] *= 0.02
    c, n, r = nystrom_factors(w, 8)
    lora_gain = (8 / 3) ** 0.5
    assert (c @ n).norm() > 50 * lora_gain  # the cause
    bc, bn, br = balance_factors(c, n, r)
    for gain in ((bn @ br).norm(), (bc @ bn).norm(), bc.norm() * br.norm()):
        assert abs(float(gain) / lora_gain - 1) < 1e-4
    p, q = c @ n @ r, bc @ bn @ br
    assert torch.nn.functional.cosine_similarity(p.flatten(), q.flatten(), dim=0) > 1 - 1e-5
