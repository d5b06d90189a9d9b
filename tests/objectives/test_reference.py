"""precompute_reference: the stored log-probs are the adapters-off log-probs of the step, a cut pass continues
where it stopped, a run with them trains like a run computing the reference in the step, full fine-tuning needs
them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune.errors import RecipeError
from slimtune.objectives import reference as ref_mod
from slimtune.objectives.logprobs import reference_logps
from slimtune.objectives.reference import REF_FILE, precompute_reference

from test_preference_training import make_recipe, trainer


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_precomputed_equals_in_step_reference(tmp_path):
    t = trainer(tmp_path, make_recipe(tmp_path, records=6))
    exs = t.data.examples
    vals = precompute_reference(t.model, exs, kind="preference", pad_id=t.data.pad_id, path=tmp_path / REF_FILE,
                                batch_size=4)
    batch = next(t.data.batches(len(exs), epoch=0))
    order = torch.as_tensor(t.data.order(0))  # the batch's (shuffled) example order
    assert torch.equal(batch["ref_logps"], torch.cat([vals[order, 0], vals[order, 1]]))
    direct = reference_logps(t.model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert torch.allclose(batch["ref_logps"].float(), direct, atol=1e-4)


def test_a_cut_pass_continues(tmp_path, monkeypatch):
    t = trainer(tmp_path, make_recipe(tmp_path, records=10))
    exs = t.data.examples
    full = precompute_reference(t.model, [dict(e) for e in exs], kind="preference", pad_id=t.data.pad_id,
                                path=tmp_path / "a" / REF_FILE, batch_size=2)
    monkeypatch.setattr(ref_mod, "SAVE_EVERY", 1)
    calls = []
    real = ref_mod._batch_logps

    def dies_after_three(model, batch_exs, kind, pad_id):
        calls.append(len(batch_exs))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, batch_exs, kind, pad_id)

    monkeypatch.setattr(ref_mod, "_batch_logps", dies_after_three)
    path = tmp_path / "b" / REF_FILE
    with pytest.raises(KeyboardInterrupt):
        precompute_reference(t.model, [dict(e) for e in exs], kind="preference", pad_id=t.data.pad_id, path=path,
                             batch_size=2)
    partial = load_file(path.with_name("reference_logps.partial.safetensors"))
    assert int(partial["done"]) == 6 and not path.exists()
    calls.clear()
    monkeypatch.setattr(ref_mod, "_batch_logps", lambda *a: (calls.append(1), real(*a))[1])
    again = precompute_reference(t.model, [dict(e) for e in exs], kind="preference", pad_id=t.data.pad_id,
                                 path=path, batch_size=2)
    assert len(calls) == 2 and torch.equal(again, full)  # the last 4 examples only, the same values
    calls.clear()
    precompute_reference(t.model, [dict(e) for e in exs], kind="preference", pad_id=t.data.pad_id, path=path,
                         batch_size=2)
    assert not calls  # finished and matching: loaded


def test_dpo_with_stored_reference_trains_like_in_step(tmp_path):
    for name, pre in (("step", False), ("stored", True)):
        t = trainer(tmp_path / name, make_recipe(tmp_path / name, steps=4, records=8,
                                                 preference={"beta": 0.5, "precompute_reference": pre}))
        t.train()
        assert (tmp_path / name / "run" / REF_FILE).is_file() == pre
    a, b = _losses(tmp_path / "step" / "run"), _losses(tmp_path / "stored" / "run")
    assert a == pytest.approx(b, rel=1e-4) and a[0] != a[-1]


def test_full_fine_tuning_needs_the_stored_reference(tmp_path):
    """Full fine-tuning: the reference is stored by default (the trained weights are the base); refusing it is a
    recipe error. DPO then trains the model's own weights."""
    full = {"kind": "full", "modules": "all-linear"}
    with pytest.raises(RecipeError, match="precompute_reference: full fine-tuning"):
        trainer(tmp_path / "no", make_recipe(tmp_path / "no", adapter=full,
                                             preference={"precompute_reference": False}), quant="none")
    t = trainer(tmp_path, make_recipe(tmp_path, adapter=full, steps=3, records=4, micro_batch=4, lr=1e-3),
                quant="none")
    t.train()
    assert (tmp_path / "run" / REF_FILE).is_file()
    losses = _losses(tmp_path / "run")
    assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-5) and losses[-1] < losses[0]
