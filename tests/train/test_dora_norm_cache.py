"""DoRA's cached row norm n = ‖W + s·B A‖ is recomputed after every optimizer step with every optimizer slimtune
offers (issue 23 item 1): bitsandbytes' 8-bit / paged AdamW write the adapter through ``p.data`` (CPU) or raw
pointers (CUDA) without bumping the version counters the cache used to be keyed on, so step 1's norm was reused
for the whole run. Checked on the fused ops (``slimtune.ops.lora_linear.dora_norm``) and on the DoRA module
(``DoRA.weight_norm``, the unfused path): every norm a forward uses — training steps and an evaluation forward
after each step — equals the norm recomputed in float64 from the tensors that forward sees."""

from __future__ import annotations

import pytest
import torch

from slimtune.adapters.base import dense_weight as module_dense_weight
from slimtune.adapters.dora import DoRA
from slimtune.ops import lora_linear as ll
from slimtune.ops.nf4 import dense_weight
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.loop import causal_lm_loss_sum

from test_loop import make_loaded, make_recipe, trainer

OPTIMIZERS = {
    "adamw": {"optimizer": "adamw"},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "paged_adamw8bit": {"optimizer": "paged_adamw8bit"},
    "host_masters": {"optimizer": "adamw", "optimizer_on": "cpu"},
    "bf16_8bit_masters": {"optimizer": "adamw8bit", "adapter_dtype": "bfloat16"},
}


class _EvalAfterStep(TrainerCallback):
    """A no-grad forward after every optimizer step (what evaluation during training runs)."""

    def __init__(self, batch):
        self.batch = batch

    def on_step_end(self, trainer, result) -> None:
        with torch.no_grad():
            causal_lm_loss_sum(trainer.model, self.batch)


def _spy_norms(monkeypatch, fused: bool, trainer_ref: dict) -> list[tuple[int, float]]:
    """(optimizer steps done, relative error of the norm used vs float64 from the same tensors), per norm use."""
    seen: list[tuple[int, float]] = []

    def rel(used: torch.Tensor, want: torch.Tensor) -> float:
        return float((used.detach().double() - want).norm() / want.norm())

    if fused:
        real = ll.dora_norm

        def spy(ops, proj, lora_A, lora_B, lora_M, *, dtype=None):
            used = real(ops, proj, lora_A, lora_B, lora_M, dtype=dtype)
            m = None if lora_M is None else lora_M.double()
            want = ll.dora_weight_norm(dense_weight(proj.base, torch.float64), lora_A.double(), lora_B.double(),
                                       proj.scale, m)
            seen.append((trainer_ref["t"].pos.step, rel(used, want)))
            return used

        monkeypatch.setattr(ll, "dora_norm", spy)
    else:
        real_method = DoRA.weight_norm

        def spy_method(self):
            used = real_method(self)
            with torch.no_grad():
                w = module_dense_weight(self.base_layer).double() + self.scale * (self.lora_B.double() @
                                                                                  self.lora_A.double())
            want = torch.linalg.vector_norm(w, dim=1)
            seen.append((trainer_ref["t"].pos.step, rel(used, want)))
            return used

        monkeypatch.setattr(DoRA, "weight_norm", spy_method)
    return seen


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "module"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_dora_norm_follows_every_optimizer_step(tmp_path, monkeypatch, opt, fused):
    if "8bit" in opt:
        pytest.importorskip("bitsandbytes")
    steps = 3
    r = make_recipe(tmp_path, records=2, steps=steps, quant="nf4", kind="dora", lr=5e-2, micro_batch=2,
                    fused=fused, max_grad_norm=0, **OPTIMIZERS[opt])
    ref: dict = {}
    seen = _spy_norms(monkeypatch, fused, ref)
    t = trainer(tmp_path, r, make_loaded("nf4"))
    ref["t"] = t
    assert any(isinstance(a, DoRA) for a in t.adapters.values())
    ids = torch.randint(3, t.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    t.callbacks.append(_EvalAfterStep({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}))
    t.train()
    assert t.pos.step == steps
    after = {s for s, _ in seen}
    assert after == set(range(steps + 1)), after  # norms used in step 1 (0 done), and after each of the 3 steps
    worst = {s: max(e for k, e in seen if k == s) for s in after}
    # the fp32 norm of the fused ops' expansion vs float64: ~1e-7; a stale one is off by the step's update
    assert max(worst.values()) < 1e-5, worst
