"""Preference objectives in the one Trainer: a tiny NF4 Llama with LoRA on the dates pairs — the loss goes down and
the reward accuracy up, a stop + resume reproduces the uninterrupted run exactly, the reference is the base with
the adapters off (in the plain and the fused model), KTO trains."""

import json
from pathlib import Path

import pytest
import torch

from slimtune.adapters.inject import adapters_of
from slimtune.config.recipe import load_recipe_dict
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.objectives.logprobs import adapters_off, completion_logps
from slimtune.train.loop import Trainer

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def make_recipe(tmp_path, objective="dpo", fmt="preference", path=None, records=16, **train):
    pref = train.pop("preference", {})
    return load_recipe_dict({
        "name": "t", "model": {"name": "tiny-llama"}, "quant": {"mode": "nf4"},
        "adapter": train.pop("adapter", {"kind": "lora", "rank": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0)}),
        "data": {"sources": [{"path": str(path or DATA / "demo_dates_pref_train.jsonl"), "max_records": records}],
                 "format": fmt, "max_seq_len": 64, **train.pop("data", {})},
        "train": {"lr": 2e-2, "steps": 8, "micro_batch": 2, "warmup": 0, "seed": 3, "fused": False,
                  "objective": objective, "preference": pref, **train},
        "output": {"dir": str(tmp_path / "run"), "export_peft": False},
    })


def make_loaded(quant="nf4"):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    return prepare_loaded(model, tok, QuantConfig(mode=quant), device=torch.device("cpu"), source="tiny")


def trainer(tmp_path, recipe, quant="nf4"):
    t = Trainer(recipe, run_dir=tmp_path / "run", loaded=make_loaded(quant))
    t.setup()
    return t


def rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,fused", [("dpo", False), ("dpo", True), ("ipo", False), ("simpo", False),
                                             ("orpo", False)])
def test_paired_objective_trains(tmp_path, objective, fused):
    t = trainer(tmp_path, make_recipe(tmp_path, objective, steps=10, micro_batch=4, fused=fused, records=4,
                                      preference={"beta": 0.5} if objective != "simpo" else {}))
    t.train()
    r = rows(tmp_path / "run")
    losses = [x["loss"] for x in r]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert sum(x["rewards/margins"] for x in r[-3:]) > sum(x["rewards/margins"] for x in r[:3])
    assert all(0.0 <= x["rewards/accuracies"] <= 1.0 for x in r)


def test_dpo_first_step_loss_is_log2_reference_is_base(tmp_path):
    """At step 0 the LoRA is the identity (B = 0): policy = reference, so every pair's DPO loss is log 2."""
    t = trainer(tmp_path, make_recipe(tmp_path, steps=1))
    res = t.step([next(t._micro_batches())])
    assert res.loss == pytest.approx(0.6931471805599453, abs=1e-6)
    assert res.metrics["rewards/margins"] == 0.0


@pytest.mark.parametrize("fused", [False, True])
def test_adapters_off_is_the_base(tmp_path, fused):
    """With the adapter moved off zero, the log-probs inside adapters_off equal those of the model with the adapter
    removed (B zeroed), and leaving the context restores the adapted model."""
    t = trainer(tmp_path, make_recipe(tmp_path, fused=fused))
    batch = next(t._micro_batches())
    ads = adapters_of(t.model)
    with torch.no_grad():
        base = completion_logps(t.model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sums
        for a in ads.values():
            a.lora_B.normal_(0, 0.5)
        adapted = completion_logps(t.model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sums
        with adapters_off(t.model):
            off = completion_logps(t.model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sums
        again = completion_logps(t.model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sums
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(off, base) and torch.equal(again, adapted)


def test_dpo_stop_and_resume_is_exact(tmp_path):
    full = trainer(tmp_path / "full", make_recipe(tmp_path / "full", grad_accum=2, dropout=0.1))
    full.train()
    r = make_recipe(tmp_path / "part", grad_accum=2, dropout=0.1)
    part = trainer(tmp_path / "part", r)
    assert part.train(stop_after=3)["interrupted"]
    resumed = trainer(tmp_path / "part", r)
    assert resumed.resume() and resumed.pos.step == 3
    resumed.train()
    assert rows(tmp_path / "part" / "run") == [dict(x, seconds=y["seconds"]) for x, y in
                                               zip(rows(tmp_path / "full" / "run"), rows(tmp_path / "part" / "run"))]


def test_kto_trains(tmp_path):
    recs = [json.loads(ln) for ln in (DATA / "demo_dates_pref_train.jsonl").read_text().splitlines()[:12]]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}) + "\n"
                            for r in recs for k in ("chosen", "rejected")))
    t = trainer(tmp_path, make_recipe(tmp_path, "kto", fmt="kto", path=path, records=6, steps=10, micro_batch=6,
                                      preference={"beta": 0.5}))
    t.train()
    r = rows(tmp_path / "run")
    assert sum(x["loss"] for x in r[-3:]) < sum(x["loss"] for x in r[:3])
    assert all(x["kl"] >= 0 for x in r)


def test_objective_and_format_must_match(tmp_path):
    from slimtune.errors import RecipeError

    with pytest.raises(RecipeError, match="train.objective: dpo trains on data.format preference, not kto"):
        trainer(tmp_path, make_recipe(tmp_path, fmt="kto"))


def test_loggers_receive_the_preference_metrics(tmp_path):
    from slimtune.train.loggers import MetricLoggers

    seen = []

    class Recording:
        def log(self, metrics, step):
            seen.append((step, metrics))

        def close(self):
            pass

    loggers = MetricLoggers([])
    loggers.backends = [Recording()]
    t = Trainer(make_recipe(tmp_path, steps=2), run_dir=tmp_path / "run", loaded=make_loaded(), callbacks=[loggers])
    t.setup()
    t.train()
    assert [s for s, _ in seen] == [1, 2]
    assert {"train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"} <= set(seen[-1][1])
